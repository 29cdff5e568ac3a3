"""Pure decoders of exchanges' raw WebSocket frames into our events (the collector's decode fast path,
docs/collector.md): msgspec typed structs, no I/O, no ccxt. One module per exchange family and channel."""
