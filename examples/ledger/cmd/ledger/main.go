// Command ledger serves the ledger example (package
// github.com/cellmesh/cellmesh/examples/ledger) beside a cellmesh sidecar.
//
//	ledger --unit us-east-1 --region us-east --listen 127.0.0.1:18301 \
//	    --data-dir /var/lib/ledger --mesh 127.0.0.1:15001 --sidecar-admin 127.0.0.1:15000
//
// SIGTERM or SIGINT stops it cleanly: no new connections, requests in
// flight finish (up to 10s), the data file is closed, exit 0. `cellmesh
// ledger` runs the same command.
package main

import (
	"os"

	"github.com/cellmesh/cellmesh/examples/ledger"
)

func main() { os.Exit(ledger.Command(os.Args[1:], os.Stderr)) }
