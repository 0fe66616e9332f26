"""Names and bounds of session settings, torch-free: the server and the command lines check
them before (or without) importing the engine, which loads torch."""

POLICIES = ("full", "window", "topk", "rekv", "resv")  # KV selection policies a session can use
RESV_PRESETS = ("default", "paper")  # vrex.resv.PRESETS (a test checks they match)
MAX_FPS = 120.0  # frames per second a session keeps at most
MAX_NEW_TOKENS = 4096  # longest answer a session may ask for
