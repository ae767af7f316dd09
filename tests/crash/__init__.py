"""Crash injection and durability tests: the real daemon SIGKILLed at named points and random instants, and strace."""
