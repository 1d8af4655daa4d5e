#!/usr/bin/env Rscript
# The reference partial Mantel test: vegan::mantel.partial on three distance matrices from files.
#
#   Rscript benchmarks/partial_mantel_vegan.R T.txt D.txt Z.txt [PERMUTATIONS]
#
# Each file is a whitespace-separated square matrix (numpy.savetxt). vegan permutes the rows and
# columns of its FIRST matrix, so pass the tree distance first: mantel.partial(t, d, z) is the scheme
# of treeprobe's partial_mantel_tree(..., pairs="all", permutation="images"); the statistic r_td.z is
# symmetric in t and d. Prints "statistic <r>", "signif <p>" (one-sided, greater) and "permutations <n>".
args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 3) stop("usage: partial_mantel_vegan.R T.txt D.txt Z.txt [PERMUTATIONS]")
suppressPackageStartupMessages(library(vegan))
read_dist <- function(path) as.dist(as.matrix(read.table(path)))
perms <- if (length(args) >= 4) as.integer(args[4]) else 999L
set.seed(1)
res <- mantel.partial(read_dist(args[1]), read_dist(args[2]), read_dist(args[3]), method = "pearson",
                      permutations = perms, parallel = 1)
cat(sprintf("statistic %.17g\n", res$statistic))
cat(sprintf("signif %.17g\n", res$signif))
cat(sprintf("permutations %d\n", res$permutations))
