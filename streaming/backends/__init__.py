"""Engines selected by `backend.name`: resident, streaming, fsdp, cerebras."""
