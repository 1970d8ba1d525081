package main

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// cellmesh demo brings the whole mesh up (3 replicas, 6 units with the
// ledger), runs the load through every unit with no client-visible
// error, and on Ctrl-C stops every process cleanly, writes its report and
// exits 0; nothing of it listens afterwards.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 15 processes")
	}
	bin, _ := buildBinaries(t)
	report := filepath.Join(t.TempDir(), "report.json")
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "demo", "--report", report, "--rate", "60", "--dir", filepath.Join(t.TempDir(), "demo"))
	cmd.WaitDelay = 10 * time.Second
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 100)
	var out strings.Builder
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	// Wait for the first progress line after the load started.
	loads := 0
	for loads < 2 {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("the demo ended early: %v\n%s\nstderr:\n%s", cmd.Wait(), out.String(), stderr.String())
			}
			out.WriteString(l + "\n")
			if strings.HasPrefix(l, "load: ") {
				loads++
			}
		case <-ctx.Done():
			t.Fatalf("no progress from the demo:\n%s", out.String())
		}
	}
	if !strings.Contains(out.String(), "cellmesh demo is up:") || !strings.Contains(out.String(), "token:") {
		t.Fatalf("the demo did not print its addresses and token:\n%s", out.String())
	}
	cmd.Process.Signal(syscall.SIGINT)
	for l := range lines {
		out.WriteString(l + "\n")
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the demo after Ctrl-C: %v\n%s\nstderr:\n%s", err, out.String(), stderr.String())
	}
	t.Logf("cellmesh demo:\n%s", out.String())
	data, err := os.ReadFile(report)
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		Units    []struct{ Name string }
		Replicas []struct{ API string }
		Load     struct {
			Requests     int64            `json:"requests"`
			WritesAcked  int64            `json:"writes_acked"`
			ClientErrors int64            `json:"client_errors"`
			ErrorKinds   map[string]int64 `json:"error_kinds"`
			ByUnit       map[string]int64 `json:"requests_by_unit"`
		}
	}
	if err := json.Unmarshal(data, &r); err != nil {
		t.Fatalf("report: %v\n%s", err, data)
	}
	if len(r.Units) != 6 || len(r.Replicas) != 3 || r.Load.WritesAcked == 0 || r.Load.ClientErrors != 0 || len(r.Load.ByUnit) != 6 {
		t.Fatalf("report: %d units, %d replicas, load %+v; want 6, 3, writes acknowledged through every unit and no client-visible error", len(r.Units), len(r.Replicas), r.Load)
	}
	for _, rep := range r.Replicas {
		if c, err := net.DialTimeout("tcp", rep.API, time.Second); err == nil {
			c.Close()
			t.Fatalf("replica API %s still answers after the demo ended", rep.API)
		}
	}
}
