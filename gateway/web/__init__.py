"""The gateway's own HTTP answers: usage and admin APIs, /metrics, the portal and its headers."""
