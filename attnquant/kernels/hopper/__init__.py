"""The Hopper (sm_90) fast path: a warp-specialized Gluon prefill kernel (kernel.py and its modules) and
its host side (launch.py: which calls it takes, config, descriptors, launch)."""
