"""Stand-ins for the outside world that tests run the real code against (umockdev testbeds, scripted servers, ...)."""
