"""WebSocket sessions (Realtime, Responses over WebSocket): relayed as is, a row per response."""
