"""Tables (markdown/CSV) and plots (PNG) generated from result files."""
