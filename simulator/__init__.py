"""Exchange simulator: Binance spot REST + WebSocket replaying real recorded trades (see server.py,
recording.py for what is recorded and what is derived). Run it with `python -m simulator`."""

from simulator.recording import Candle, Recording, RecordingFormatError, Trade, real_data_dir
from simulator.server import FaultError, Simulator, SimulatorOptions, start_simulator

__all__ = ["Candle", "FaultError", "Recording", "RecordingFormatError", "Simulator", "SimulatorOptions", "Trade",
           "real_data_dir", "start_simulator"]
