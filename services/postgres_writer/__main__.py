from common.bus.stage import service_main
from services.postgres_writer.service import PostgresWriter

service_main(PostgresWriter)
