"""The `metering-gateway` commands: functions of their parsed arguments, by what they work on."""
