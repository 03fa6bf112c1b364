"""The `/v1/*` request path: the handler and its stages, the call, intake, walls between teams."""
