"""Turning scores into words and pictures: structured reports (templates in two languages), charts."""
