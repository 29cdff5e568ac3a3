"""Exchange simulator: simulated exchanges (venues, venue.py: Binance spot in spot.py, always served, and the venues
usdm.py, coinbase.py, hyperliquid.py on request) replaying real recordings on one port (server.py); recording.py
says what is recorded and what is derived. Run it with `python -m simulator`."""

from simulator.recording import Candle, Recording, RecordingFormatError, Trade, real_data_dir
from simulator.server import FaultError, Simulator, SimulatorOptions, start_simulator

__all__ = ["Candle", "FaultError", "Recording", "RecordingFormatError", "Simulator", "SimulatorOptions", "Trade",
           "real_data_dir", "start_simulator"]
