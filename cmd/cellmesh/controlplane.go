package main

import (
	"context"
	"errors"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/cellmesh/cellmesh/controlplane"
	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
)

// tokenEnv holds the API token when no file gives it.
const tokenEnv = "CELLMESH_TOKEN"

func runControlPlane(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("controlplane", "cellmesh controlplane --id ID --data-dir DIR --tls-ca F --tls-cert F --tls-key F [--topology FILE | --join API]...",
		`Runs one control-plane replica: the topology, shard map, registered
endpoints and operator log in raft (log and snapshots in --data-dir), xDS
(ADS over gRPC with mutual TLS) for the sidecars, and the operator API
(/v1/..., bearer token) with /metrics, /healthz and /readyz.

A first replica with an empty --data-dir starts a new cluster of one and
applies --topology. Further replicas start with --join pointing at the API
of any replica of the cluster, and become voters (3 or 5, one per region).
A restarted replica comes back from its --data-dir: --join and --topology
may stay on its command line. A --topology newer than the state's is
applied by the leader (a valid successor only).

The API token comes from --token-file, else $CELLMESH_TOKEN; every replica
of a cluster uses the same one. Without one the replica refuses to start,
unless --insecure-dev (no authentication: development machines only).
The certificate must be for service `+meshtls.ControlPlaneService+` (cellmesh certs
issue --service `+meshtls.ControlPlaneService+` --unit ID --region R).

With --gossip the replica joins the gossip pool (hashicorp/memberlist,
encrypted with --gossip-key-file): the leader takes dead sidecars out of
the endpoints it serves and stops renewing the lease of a unit gossip finds
down. GET /v1/members shows members, units and regions with their health,
GET /v1/events the health event log.

SIGTERM or SIGINT stops the replica; its state stays on disk.`, stderr)
	id := fs.String("id", "", "replica name, unique in the cluster (required)")
	region := fs.String("region", "", "region the replica runs in")
	dataDir := fs.String("data-dir", "", "directory of the raft log and snapshots (required)")
	raftAddr := fs.String("raft", "127.0.0.1:7702", "raft transport address (ip:port)")
	raftAdv := fs.String("raft-advertise", "", "raft address other replicas reach, when not --raft")
	apiAddr := fs.String("api", "127.0.0.1:7700", "operator API address (ip:port)")
	xdsAddr := fs.String("xds", "127.0.0.1:7701", "xDS (ADS, gRPC with mutual TLS) address (ip:port)")
	var join listFlag
	fs.Var(&join, "join", "API address of a replica of an existing cluster (repeatable or comma-separated)")
	topoFile := fs.String("topology", "", "topology file applied when the state has none or an older version")
	tokenFile := fs.String("token-file", "", "file holding the API bearer token (default: $"+tokenEnv+")")
	insecure := fs.Bool("insecure-dev", false, "run the API without a token (development only)")
	ca := fs.String("tls-ca", "", "CA bundle of the mesh (required)")
	cert := fs.String("tls-cert", "", "this replica's certificate (required)")
	key := fs.String("tls-key", "", "this replica's key (required)")
	gossip := addGossipFlags(fs)
	var handoff listFlag
	fs.Var(&handoff, "handoff-service", "a service that holds data and implements the handoff contract (repeatable or comma-separated): checked before any handoff")
	handoffTimeout := fs.Duration("handoff-timeout", 5*time.Second, "how long a planned handoff waits for its standby to catch up before it is blocked")
	level := fs.String("log-level", "info", "log level: debug, info, warn or error")
	format := fs.String("log-format", "text", "log format: text or json")
	if code, done := parse(fs, args, stdout); done {
		return code
	}
	if fs.NArg() > 0 {
		return usagef(stderr, "controlplane", "unexpected argument %q", fs.Arg(0))
	}
	for _, req := range []struct{ flag, v string }{{"id", *id}, {"data-dir", *dataDir}, {"tls-ca", *ca}, {"tls-cert", *cert}, {"tls-key", *key}} {
		if req.v == "" {
			return usagef(stderr, "controlplane", "--%s is required", req.flag)
		}
	}
	log, err := newLogger(stderr, *level, *format)
	if err != nil {
		return usagef(stderr, "controlplane", "%v", err)
	}
	token, err := readToken(*tokenFile)
	if err != nil {
		return failf(stderr, "controlplane", "%v", err)
	}
	if token != "" && *insecure {
		return usagef(stderr, "controlplane", "--insecure-dev and a token exclude each other")
	}
	var topo *routing.Topology
	if *topoFile != "" {
		if topo, err = topofile.Load(*topoFile); err != nil {
			return failf(stderr, "controlplane", "%v", err)
		}
	}
	gc, err := gossip.config(*insecure)
	if err != nil {
		return failf(stderr, "controlplane", "%v", err)
	}
	tlsStore, err := meshtls.Load(meshtls.Files{CA: *ca, Cert: *cert, Key: *key}, nil)
	if err != nil {
		return failf(stderr, "controlplane", "%v", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if *insecure {
		log.Warn("the operator API runs WITHOUT authentication (--insecure-dev): anyone who reaches it can move shards")
	}
	r, err := controlplane.Open(controlplane.Config{
		ID: *id, Region: *region, DataDir: *dataDir, Raft: *raftAddr, RaftAdvertise: *raftAdv,
		API: *apiAddr, XDS: *xdsAddr, Join: join, Topology: topo, Token: token, InsecureDev: *insecure,
		TLS: tlsStore, Gossip: gc, HandoffServices: handoff, HandoffTimeout: *handoffTimeout, Logger: log, Registry: reg,
	})
	if err != nil {
		return failf(stderr, "controlplane", "%v", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go tlsStore.Watch(ctx, meshtls.DefaultWatchInterval, log)
	if ms := r.Gossip(); ms != nil && *gossip.keyFile != "" {
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		kick := make(chan struct{}, 1)
		go func() {
			for range hup {
				select {
				case kick <- struct{}{}:
				default:
				}
			}
		}()
		go ms.WatchKeyFile(ctx, *gossip.keyFile, meshtls.DefaultWatchInterval, kick)
	}
	if err := r.Run(ctx); err != nil {
		log.Error("control plane stopped with an error", "error", err)
		return exitError
	}
	return exitOK
}

// readToken reads the API token from file, else from the environment.
func readToken(file string) (string, error) {
	if file == "" {
		return strings.TrimSpace(os.Getenv(tokenEnv)), nil
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return "", errors.New("token file: " + err.Error())
	}
	t := strings.TrimSpace(string(data))
	if t == "" {
		return "", errors.New("token file " + file + " is empty")
	}
	return t, nil
}
