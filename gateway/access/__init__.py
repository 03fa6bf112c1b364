"""Who is calling and what they may call: gateway keys, their lookup, expiry and allow-lists."""
