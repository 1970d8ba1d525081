package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/proxy"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// defaultReload is how often a sidecar checks its files for changes when
// the file does not say.
const defaultReload = 10 * time.Second

func runSidecar(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("sidecar", "cellmesh sidecar --config FILE [--log-level info] [--log-format text]",
		`Runs the sidecar beside one service instance: the outbound listener
for the local app (HTTP/1.1 and h2c), the inbound QUIC/HTTP/3 listener with
mutual TLS for other units (and the HTTP/2-over-TLS fallback when the file
turns it on), and the admin port (/healthz, /readyz, /metrics, /config).
See examples/local/*.yaml for the file.

The shard map and endpoints come from the files (topology, endpoints) or,
with an xds section, from the control plane: the sidecar registers its
inbound listener with a replica, follows what it pushes, fails over between
the replicas listed, and is ready once the first map arrives.

The files (config, topology, certificates) are checked every
reload_interval (default 10s) and at once on SIGHUP; a change that loads
is applied without dropping a request, one that does not is logged and
changes nothing. SIGTERM or SIGINT drains: no new connections, requests in
flight finish within drain_timeout, exit 0.`, stderr)
	config := fs.String("config", "", "sidecar configuration file (required)")
	level := fs.String("log-level", "info", "log level: debug, info, warn or error")
	format := fs.String("log-format", "text", "log format: text or json")
	if code, done := parse(fs, args, stdout); done {
		return code
	}
	if fs.NArg() > 0 {
		return usagef(stderr, "sidecar", "unexpected argument %q", fs.Arg(0))
	}
	if *config == "" {
		return usagef(stderr, "sidecar", "--config is required")
	}
	if os.Getenv("GOGC") == "" {
		// A sidecar's live heap is a few MiB and its garbage is per-request
		// buffers: collecting at 5x instead of 2x the live heap costs a few
		// MiB of RSS and saves about a tenth of its CPU at saturation
		// (BENCHMARKS.md). GOGC in the environment wins.
		debug.SetGCPercent(400)
	}
	log, err := newLogger(stderr, *level, *format)
	if err != nil {
		return usagef(stderr, "sidecar", "%v", err)
	}
	st, err := proxy.LoadStatic(*config)
	if err != nil {
		return failf(stderr, "sidecar", "%v", err)
	}
	store, err := meshtls.Load(st.TLSFiles, nil)
	if err != nil {
		return failf(stderr, "sidecar", "%v", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	cfg := st.Config
	cfg.TLS, cfg.Logger, cfg.Registry = store, log, reg
	s, err := proxy.New(cfg)
	if err != nil {
		return failf(stderr, "sidecar", "%v", err)
	}
	defer s.Close()
	if st.XDS == nil {
		if err := s.Apply(st); err != nil {
			return failf(stderr, "sidecar", "%v", err)
		}
	}
	if err := s.Listen(); err != nil {
		return failf(stderr, "sidecar", "%v", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	kick, keyKick := make(chan struct{}, 1), make(chan struct{}, 1)
	go func() {
		for range hup {
			for _, k := range []chan struct{}{kick, keyKick} {
				select {
				case k <- struct{}{}:
				default:
				}
			}
		}
	}()
	interval := st.Reload
	if interval == 0 {
		interval = defaultReload
	}
	watchCtx, cancelWatch := context.WithCancel(context.Background())
	defer cancelWatch()
	go s.WatchStatic(watchCtx, st, interval, kick)
	go store.Watch(watchCtx, interval, log)
	runCtx, cancelRun := context.WithCancel(ctx)
	defer cancelRun()
	xdsErr := make(chan error, 2) // the xDS client's and gossip's start
	if st.XDS != nil {
		// The client follows the control plane until the sidecar has
		// drained, so requests in flight are fenced with the newest map.
		// It fails only at its start, and then the sidecar stops too.
		xdsDone := make(chan struct{})
		go func() {
			defer close(xdsDone)
			if err := s.RunXDS(watchCtx, *st.XDS); err != nil {
				xdsErr <- err
				cancelRun()
			}
		}()
		defer func() {
			cancelWatch()
			<-xdsDone
		}()
	}

	if st.Gossip != nil {
		// The sidecar leaves the pool when asked to stop, as its drain
		// begins: the others see it left, not dead.
		gossipDone := make(chan struct{})
		go func() {
			defer close(gossipDone)
			if err := s.RunGossip(runCtx, *st.Gossip, keyKick); err != nil {
				log.Error("gossip stopped; the sidecar stops too", "error", err)
				xdsErr <- err
				cancelRun()
			}
		}()
		defer func() { <-gossipDone }()
	}

	err = s.Run(runCtx)
	select {
	case xerr := <-xdsErr:
		log.Error("the xds client or gossip could not start; stopped the sidecar", "error", xerr)
		return exitError
	default:
	}
	if err != nil {
		var de *proxy.DrainError
		if errors.As(err, &de) && ctx.Err() != nil {
			// Asked to stop, and stopped: the cut requests are logged.
			log.Warn("sidecar stopped after its drain deadline")
			return exitOK
		}
		log.Error("sidecar stopped with an error", "error", err)
		return exitError
	}
	log.Info("sidecar stopped")
	return exitOK
}

// newLogger builds the process logger.
func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, err
	}
	opts := &slog.HandlerOptions{Level: l}
	switch strings.ToLower(format) {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, &formatError{format}
}

type formatError struct{ got string }

func (e *formatError) Error() string { return "--log-format " + e.got + ": want text or json" }
