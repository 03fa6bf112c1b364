"""Talking to the upstream: the HTTP/1.1 client, header rewriting, the byte relay, pacing."""
