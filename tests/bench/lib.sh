# Shell helpers the benchmark scripts share; sourced, not run. A script that needs a different
# version of one defines its own after sourcing this.

# A free TCP port on loopback.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
# Wait up to 10 s for something to listen on 127.0.0.1:PORT.
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
# Wait up to 30 s for GET http://127.0.0.1:PORT/PATH to succeed.
wait_http() { for _ in $(seq 1 300); do curl -fs "http://127.0.0.1:$1$2" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
# A process's user + system CPU time in clock ticks (divide by `getconf CLK_TCK`).
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# Sum of a Prometheus metric (every label set) from http://127.0.0.1:PORT/metrics.
metric() { curl -fs "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 ~ "^"m"[{ ]" || $1 == m {s+=$2} END {printf "%d\n", s}'; }
# Median of the numbers on stdin, one per line.
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
