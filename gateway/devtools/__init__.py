"""Development tools the serving path never imports: the fake upstream and the offline demo."""
