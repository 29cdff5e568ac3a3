from common.bus.stage import service_main
from services.gap_repair.service import GapRepair

if __name__ == "__main__":
    service_main(GapRepair)
