"""The console: server-rendered pages for the people who run the lists, a client of the six
services' public HTTP APIs (issue 20)."""
