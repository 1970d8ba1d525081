package ledger

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Command is the ledger's command line: its flags in args, messages to
// stderr, the exit code returned. It serves until SIGTERM or SIGINT.
// Both the ledger binary and `cellmesh ledger` (the demo's) run it.
func Command(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("ledger", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg Config
	listen := fs.String("listen", "127.0.0.1:18301", "address of the ledger's API (its sidecar's app address)")
	fs.StringVar(&cfg.Unit, "unit", "", "unit this instance serves (required)")
	fs.StringVar(&cfg.Region, "region", "", "region of the unit (required)")
	fs.StringVar(&cfg.Service, "service", "ledger", "the ledger's service name in the mesh")
	fs.StringVar(&cfg.DataDir, "data-dir", "", "directory of ledger.db (required)")
	fs.StringVar(&cfg.Mesh, "mesh", "127.0.0.1:15001", "the sidecar's outbound address")
	fs.StringVar(&cfg.SidecarAdmin, "sidecar-admin", "127.0.0.1:15000", "the sidecar's admin address (its /config gives the shard map)")
	fs.DurationVar(&cfg.ApplyDelay, "apply-delay", 0, "fault injection: a standby applies each entry this much later")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	cfg.Logger, cfg.Registry = log, reg
	if cfg.DataDir != "" {
		if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
			fmt.Fprintln(stderr, "ledger:", err)
			return 1
		}
	}
	l, err := New(cfg)
	if err != nil {
		fmt.Fprintln(stderr, "ledger:", err)
		return 2
	}
	defer l.Close()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Error("listen", "addr", *listen, "error", err)
		return 1
	}
	log.Info("listening", "addr", ln.Addr().String(), "unit", cfg.Unit, "region", cfg.Region)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go l.Run(ctx)
	srv := &http.Server{Handler: l.Handler(), ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		log.Error("serve", "error", err)
		return 1
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Warn("requests cut at shutdown", "error", err)
		return 1
	}
	log.Info("stopped")
	return 0
}
