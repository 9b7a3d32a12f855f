"""Dataset side of the engine: discovery and pairing, media decode, window arithmetic, checks (doctor).

Submodules are imported explicitly by their users; nothing heavy (torch) is imported here.
"""
