from common.service import service_main
from services.postgres_writer.service import PostgresWriter

service_main(PostgresWriter)
