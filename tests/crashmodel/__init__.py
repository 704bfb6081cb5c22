"""A crash-state explorer in the manner of ALICE (OSDI 2014) and CrashMonkey (OSDI 2018).

strace.py records a real daemon's file-system calls, model.py turns them into operations on
inodes and knows which a power cut may drop, states.py enumerates the distinct crash states,
check.py starts the daemon on each and checks the promise, explore.py ties the workloads
together (CI runs a bounded sample, `scripts/torture --crash-states` all of them).
"""
