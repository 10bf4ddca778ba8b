"""Deploy, verify, roll back: steps run against one server at a time (scripts/deploy/server.py),
using the release layout that server_tool.py keeps on the server."""
