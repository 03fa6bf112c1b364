"""The HTTP/1.1 front door: proxied calls on a lean protocol, everything else on aiohttp's."""
