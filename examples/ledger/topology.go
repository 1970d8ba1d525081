package ledger

import _ "embed"

// Topology is the ledger's topology file (topology.yaml): three regions of
// two units, 60 shards, standbys in the two other regions. The demo runs
// it.
//
//go:embed topology.yaml
var Topology []byte
