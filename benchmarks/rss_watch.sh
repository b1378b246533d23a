#!/usr/bin/env bash
# rss_watch.sh LOG CMD...: runs CMD (its output to LOG.out), samples its resident memory every 0.25 s into LOG
# ("unix-time MB" lines), and prints its exit status and the peak sample (benchmarks/RESULTS.md, issue 35).
log=$1; shift
"$@" > "$log.out" 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null; do
  r=$(ps -o rss= -p $pid 2>/dev/null | tr -d ' ')
  [ -n "$r" ] && echo "$(date +%s.%N | cut -c1-14) $((r / 1024))" >> "$log"
  sleep 0.25
done
wait $pid; echo "exit $?"
sort -k2 -n "$log" | tail -1
