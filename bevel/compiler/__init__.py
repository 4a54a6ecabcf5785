"""The compiler: pipeline language, pass manager, compile(), report, torch.compile backend and CLI."""
