// Command echo serves the echo example service (package
// github.com/cellmesh/cellmesh/examples/echo) over HTTP/1.1 and h2c.
//
//	echo --unit us-east-1 --region us-east [--listen 127.0.0.1:8080] [--service echo]
//
// It logs to stderr with log/slog: one "listening" line holding the address
// it bound (key addr, first, so that port 0 can be read back), and one line
// when it stops. SIGTERM or SIGINT stops it: it refuses new connections,
// waits up to 10s for requests in flight, and exits 0; if requests are still
// running then it closes them and exits 1. Bad flags exit 2, a listen or
// serve failure exits 1.
package main

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
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/cellmesh/cellmesh/examples/echo"
)

const (
	// readHeaderTimeout bounds how long a client may take to send headers,
	// so idle half-open connections do not pile up.
	readHeaderTimeout = 10 * time.Second
	// shutdownTimeout is how long requests in flight may finish after a signal.
	shutdownTimeout = 10 * time.Second
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

type options struct {
	listen string
	info   echo.Info
}

// parse reads the flags and reports every problem at once.
func parse(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("echo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.listen, "listen", "127.0.0.1:8080", "`address` to serve HTTP/1.1 and h2c on; port 0 picks a free port")
	fs.StringVar(&o.info.Service, "service", "echo", "service `name` reported in answers")
	fs.StringVar(&o.info.Unit, "unit", "", "`unit` this instance belongs to (required)")
	fs.StringVar(&o.info.Region, "region", "", "`region` of the unit (required)")
	if err := fs.Parse(args); err != nil {
		return o, err // the flag package has printed it with the usage
	}

	var problems []string
	if fs.NArg() > 0 {
		problems = append(problems, fmt.Sprintf("unexpected arguments %q", fs.Args()))
	}
	if o.info.Unit == "" {
		problems = append(problems, "--unit is required")
	}
	if o.info.Region == "" {
		problems = append(problems, "--region is required")
	}
	if o.info.Service == "" {
		problems = append(problems, "--service must not be empty")
	}
	if _, _, err := net.SplitHostPort(o.listen); err != nil {
		problems = append(problems, fmt.Sprintf("--listen %q: want host:port: %v", o.listen, err))
	}
	if len(problems) > 0 {
		err := errors.New(strings.Join(problems, "; "))
		fmt.Fprintf(stderr, "echo: %v\nRun 'echo -h' for usage.\n", err)
		return o, err
	}
	return o, nil
}

func run(args []string, stderr io.Writer) int {
	o, err := parse(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		return 2
	}

	logger := slog.New(slog.NewTextHandler(stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)

	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		logger.Error("listen failed", "addr", o.listen, "err", err)
		return 1
	}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{
		Handler:           echo.Handler(o.info, reg),
		ReadHeaderTimeout: readHeaderTimeout,
		Protocols:         &protocols,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	logger.Info("listening", "addr", ln.Addr().String(),
		"service", o.info.Service, "unit", o.info.Unit, "region", o.info.Region)

	select {
	case err := <-served:
		logger.Error("serve failed", "err", err)
		return 1
	case <-ctx.Done():
	}
	stop() // a second signal kills the process the default way
	logger.Info("stopping", "reason", context.Cause(ctx).Error())

	start := time.Now()
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
		<-served
		logger.Error("stopped with requests still running", "err", err,
			"shutdown_seconds", time.Since(start).Seconds())
		return 1
	}
	<-served
	logger.Info("stopped", "shutdown_seconds", time.Since(start).Seconds())
	return 0
}
