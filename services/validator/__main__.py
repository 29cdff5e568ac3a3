from common.service import service_main
from services.validator.service import Validator

service_main(Validator)
