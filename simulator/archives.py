"""data.binance.vision kline archives, as the simulator serves them.

    GET /data.binance.vision/data/spot/daily/klines/BTCUSDT/1m/BTCUSDT-1m-2020-01-01.zip   (+ .CHECKSUM)
    GET /data.binance.vision/data/spot/monthly/klines/BTCUSDT/1m/BTCUSDT-1m-2022-01.zip    (+ .CHECKSUM)
(also without the host prefix). What is served:
- a zip that exists in the real data (`binance-spot-1m-daily/`): the real file, byte for byte, and its real
  CHECKSUM file;
- any other 1m day or month of a symbol the simulator has history for: a zip BUILT here from the candles the
  simulator's REST serves for that period (history.py: real rows where recorded, derived elsewhere), in
  Binance's layout: one headerless 12-column CSV named like the zip, timestamps in milliseconds before 2025
  and in microseconds from 2025-01-01 on (as Binance's spot archives switched). The zip is deterministic
  (fixed entry date), so its CHECKSUM (`<sha256>  <name>`) is stable across requests and restarts;
- 404 with S3's XML body for anything else: other intervals, periods not complete yet (a day is published
  after it ends; here: when it ends before the history's end and before now), unknown symbols.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from simulator.history import History
from simulator.recording import MINUTE_MS

_NAME = re.compile(r"^(?P<symbol>[A-Z0-9]+)-(?P<tf>1m)-(?P<period>\d{4}-\d{2}(?:-\d{2})?)\.zip$")
MICROSECONDS_FROM_MS = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1000)


def parse_name(name: str) -> tuple[str, str, str] | None:
    m = _NAME.match(name)
    return (m["symbol"], m["tf"], m["period"]) if m else None


def period_span_ms(period: str) -> tuple[int, int]:
    if len(period) == 7:
        y, mo = (int(x) for x in period.split("-"))
        first = datetime(y, mo, 1, tzinfo=UTC)
        nxt = datetime(y + (mo == 12), mo % 12 + 1, 1, tzinfo=UTC)
    else:
        first = datetime.fromisoformat(period).replace(tzinfo=UTC)
        nxt = first + timedelta(days=1)
    return int(first.timestamp() * 1000), int(nxt.timestamp() * 1000)


def build(name: str, data_dir: Path, history: History | None, now_s: float) -> bytes | None:
    """The zip's bytes, or None when data.binance.vision would answer 404 (see the module docstring)."""
    parsed = parse_name(name)
    if parsed is None:
        return None
    real = data_dir / "binance-spot-1m-daily" / name
    if real.exists():
        return real.read_bytes()
    if history is None:
        return None
    symbol, _tf, period = parsed
    try:
        start, end = period_span_ms(period)
    except ValueError:
        return None
    if end > history.end_ms or end > now_s * 1000:
        return None
    candles = history.between(symbol, start, end - 1, (end - start) // MINUTE_MS, True, int(now_s * 1000))
    if not candles:
        return None
    micro = start >= MICROSECONDS_FROM_MS
    lines = []
    for c in candles:
        row = c.rest_row()
        if micro:
            row[0], row[6] = row[0] * 1000, row[6] * 1000 + 999
        lines.append(",".join(str(x) for x in row))
    csv_name = name.removesuffix(".zip") + ".csv"
    buf = io.BytesIO()
    y, m, d = (int(x) for x in (period + "-01")[:10].split("-"))
    info = zipfile.ZipInfo(csv_name, date_time=(y, m, d, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(info, "\n".join(lines) + "\n", compresslevel=6)
    return buf.getvalue()


def checksum_text(blob: bytes, name: str) -> str:
    """A data.binance.vision CHECKSUM file: `<sha256 hex>  <zip name>`."""
    return f"{hashlib.sha256(blob).hexdigest()}  {name}\n"


def corrupt(blob: bytes) -> bytes:
    """The same zip with one byte of its middle changed (the corrupt_archive fault)."""
    i = len(blob) // 2
    return blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:]


def not_found(path: str) -> str:
    key = path.split("/data/", 1)[-1]
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code><Message>The specified key '
            f'does not exist.</Message><Key>data/{key}</Key></Error>')
