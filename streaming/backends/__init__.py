"""Engines selected by `backend.name`: resident, streaming, cerebras."""
