"""A crash-state explorer in the manner of ALICE (OSDI 2014) and CrashMonkey (OSDI 2018).

strace.py and resolve.py turn a real daemon's recorded file-system calls into operations on
inodes, model.py knows which a power cut may drop, states.py enumerates the distinct crash
states, check.py starts the daemon on each and checks the promise, workloads.py holds the
short runs recorded (record.py), and explore.py ties them together: CI runs a bounded
sample, `scripts/torture --crash-states` all of them.
"""
