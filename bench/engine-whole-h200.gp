# gnuplot bench/engine-whole-h200.gp (from the repo root): bench/engine-whole-h200.png
set terminal pngcairo size 900,560 font ",11"
set output "bench/engine-whole-h200.png"
set title "nibble bench, Llama-2-7B shapes, Atom's request mix, one H200 (label: requests, session of the run)"
set xlabel "mean TPOT (ms)"; set ylabel "output tokens/s"
set grid; set key top left
set arrow from 50, graph 0 to 50, graph 1 nohead dt 2 lc rgb "gray40"
set label "TPOT 50 ms" at 50.5, graph 0.05
plot for [r in "atom-w4a4 fp16 w8a8"] "bench/engine-whole-h200.dat" using (strcol(1) eq r ? $4 : NaN):3 with linespoints pt 7 ps 1.3 title r, \
     "bench/engine-whole-h200.dat" using 4:3:(sprintf("%d (s%d)", $2, $5)) with labels offset 0,1 notitle
