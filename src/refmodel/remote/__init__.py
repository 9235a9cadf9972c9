"""Talking to a reference service: the binary wire format (:mod:`.wire`, shared with the server) and the client."""
