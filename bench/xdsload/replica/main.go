// Command replica runs one control-plane replica as `cellmesh
// controlplane` does (a single replica that bootstraps itself and applies
// --topology), with net/http/pprof on --pprof: bench/controlplane.sh
// uses it for PROFILE=1 runs. It is bench tooling; the product has no
// pprof endpoint.
//
//	replica --data-dir D --raft A --api A --xds A --topology F --token-file F \
//	        --tls-ca F --tls-cert F --tls-key F --pprof 127.0.0.1:6060
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	_ "net/http/pprof"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/cellmesh/cellmesh/controlplane"
	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/routing/topofile"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "replica:", err)
		os.Exit(1)
	}
}

func run() error {
	fs := flag.NewFlagSet("replica", flag.ContinueOnError)
	id := fs.String("id", "cp-1", "replica name")
	dataDir := fs.String("data-dir", "", "raft directory (required)")
	raftAddr := fs.String("raft", "127.0.0.1:7702", "raft address")
	apiAddr := fs.String("api", "127.0.0.1:7700", "operator API address")
	xdsAddr := fs.String("xds", "127.0.0.1:7701", "xDS address")
	topoFile := fs.String("topology", "", "topology file (required)")
	tokenFile := fs.String("token-file", "", "API token file (required)")
	ca := fs.String("tls-ca", "", "mesh CA bundle")
	cert := fs.String("tls-cert", "", "replica certificate")
	key := fs.String("tls-key", "", "replica key")
	pprofAddr := fs.String("pprof", "127.0.0.1:6060", "net/http/pprof address")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if *dataDir == "" || *topoFile == "" || *tokenFile == "" {
		return errors.New("--data-dir, --topology and --token-file are required")
	}
	topo, err := topofile.Load(*topoFile)
	if err != nil {
		return err
	}
	tok, err := os.ReadFile(*tokenFile)
	if err != nil {
		return err
	}
	tlsStore, err := meshtls.Load(meshtls.Files{CA: *ca, Cert: *cert, Key: *key}, nil)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	r, err := controlplane.Open(controlplane.Config{
		ID: *id, DataDir: *dataDir, Raft: *raftAddr, API: *apiAddr, XDS: *xdsAddr,
		Topology: topo, Token: strings.TrimSpace(string(tok)), TLS: tlsStore, Logger: log, Registry: reg,
	})
	if err != nil {
		return err
	}
	ps := &http.Server{Addr: *pprofAddr, Handler: http.DefaultServeMux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := ps.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("pprof", "error", err)
		}
	}()
	defer ps.Close()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return r.Run(ctx)
}
