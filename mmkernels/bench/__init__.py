"""The benchmark runner behind `mmkernels bench` and `make bench`: every case is checked for
correctness against a peer, then timed side by side with its peers in one run."""
