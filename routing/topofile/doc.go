// Package topofile reads and writes topology files: YAML with snake_case
// keys, one topology per file, as in examples/topology/three-regions.yaml.
//
// It owns the file's shape: which keys exist and what each holds, whole
// numbers that are not silently truncated, lists without empty items, shard
// sets written as "0-16,global", the defaults an omitted epoch or state
// stands for, and how many shards one file may list. Parse reports every
// shape problem at once, each with its line and in the file's words, and
// Encode writes what Parse reads back.
//
// It must not decide what a topology means: whether units and regions
// exist, shards are covered once, epochs are 1 or more, or rules make sense
// is routing.Topology.Validate, which this package never calls; a file of
// the right shape is returned as written, never repaired.
package topofile
