from common.service import service_main
from services.gap_repair.service import GapRepair

if __name__ == "__main__":
    service_main(GapRepair)
