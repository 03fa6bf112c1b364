"""What a call costs: price tables, the maintained price database, integer nano-USD arithmetic."""
