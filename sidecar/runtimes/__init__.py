"""Container runtimes: discovery adapters in front of the one cgroup reader/writer."""
