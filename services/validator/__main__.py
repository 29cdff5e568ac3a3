from common.bus.stage import service_main
from services.validator.service import Validator

service_main(Validator)
