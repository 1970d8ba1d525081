package main

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// cellmesh demo brings the whole mesh up (3 replicas, 6 units with the
// ledger) and runs the load through every unit; a region is evacuated and
// restored with cellmesh drill meanwhile, with no client-visible error;
// on Ctrl-C the demo stops every process cleanly, writes its report and
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
	api := regexp.MustCompile(`control plane API: http://(\S+)`).FindStringSubmatch(out.String())
	token := regexp.MustCompile(`token: +([0-9a-f]+)`).FindStringSubmatch(out.String())
	if api == nil || token == nil {
		t.Fatalf("the demo did not print its API address and token:\n%s", out.String())
	}
	// Drills against the running demo, through the CLI: a dry run, an
	// evacuation of region eu (its 20 shards, one planned handoff after
	// another, under the load) and the restore.
	drill := func(args ...string) string {
		t.Helper()
		c := exec.CommandContext(ctx, bin, append([]string{"drill"}, append(args, "--api", api[1], "--timeout", "30s")...)...)
		c.Env = append(os.Environ(), "CELLMESH_TOKEN="+token[1])
		b, err := c.CombinedOutput()
		if err != nil {
			t.Fatalf("cellmesh drill %s: %v\n%s", strings.Join(args, " "), err, b)
		}
		return string(b)
	}
	if o := drill("evacuate", "--region", "eu", "--dry-run"); !strings.Contains(o, "20 shards to move; the plan passes every safety rule") {
		t.Fatalf("dry run:\n%s", o)
	}
	if o := drill("evacuate", "--region", "eu"); !strings.Contains(o, "done: 20 of 20 shards moved") || !strings.Contains(o, "RPO check: 20 of 20") {
		t.Fatalf("evacuation:\n%s", o)
	} else {
		t.Logf("cellmesh drill evacuate --region eu:\n%s", o)
	}
	if o := drill("restore", "--region", "eu"); !strings.Contains(o, "done: 20 of 20 shards moved") {
		t.Fatalf("restore:\n%s", o)
	}
	if o := drill("list"); strings.Count(o, " done ") != 2 {
		t.Fatalf("drill list:\n%s", o)
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
		Check    *struct {
			Verified   int `json:"verified"`
			Mismatches int `json:"mismatches"`
			Unreadable int `json:"unreadable"`
		} `json:"acknowledged_writes_check"`
		Load struct {
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
	if r.Check == nil || r.Check.Verified == 0 || r.Check.Mismatches != 0 || r.Check.Unreadable != 0 {
		t.Fatalf("the check of acknowledged writes: %+v", r.Check)
	}
	for _, rep := range r.Replicas {
		if c, err := net.DialTimeout("tcp", rep.API, time.Second); err == nil {
			c.Close()
			t.Fatalf("replica API %s still answers after the demo ended", rep.API)
		}
	}
}

// cellmesh demo --duration D --drill evacuate:ap@T: the drill runs through
// the control plane under the load and moves every shard of the region; the
// report says so, with no client-visible error and every acknowledged
// write found; the demo exits 0.
func TestDemoScheduledDrill(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 15 processes")
	}
	bin, _ := buildBinaries(t)
	report := filepath.Join(t.TempDir(), "report.json")
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "demo", "--duration", "20s", "--drill", "evacuate:ap@6s", "--rate", "60", "--report", report)
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cellmesh demo: %v\n%s", err, out)
	}
	t.Logf("cellmesh demo:\n%s", out)
	// Bad drills are refused before anything starts.
	for _, bad := range []string{"evacuate:mars@1s", "melt:ap@1s", "evacuate:ap", "evacuate:ap@soon"} {
		c := exec.CommandContext(ctx, bin, "demo", "--duration", "1s", "--drill", bad)
		if b, err := c.CombinedOutput(); err == nil || !strings.Contains(string(b), bad[:strings.IndexAny(bad, ":")]) {
			t.Fatalf("cellmesh demo --drill %s: %v\n%s", bad, err, b)
		}
	}
	data, err := os.ReadFile(report)
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		Drills []struct {
			Phase  string
			Report struct {
				Moved, Total int
				Region       string
				Shards       []struct {
					From  string
					RPOOK bool `json:"rpo_ok"`
				}
			}
		}
		Check struct {
			Verified   int `json:"verified"`
			Mismatches int `json:"mismatches"`
			Unreadable int `json:"unreadable"`
		} `json:"acknowledged_writes_check"`
		Load struct {
			ClientErrors int64            `json:"client_errors"`
			ErrorKinds   map[string]int64 `json:"error_kinds"`
		}
	}
	if err := json.Unmarshal(data, &r); err != nil {
		t.Fatal(err)
	}
	if len(r.Drills) != 1 || r.Drills[0].Phase != "done" || r.Drills[0].Report.Region != "ap" || r.Drills[0].Report.Moved != 20 || r.Drills[0].Report.Total != 20 {
		t.Fatalf("the drill in the report: %+v", r.Drills)
	}
	for _, s := range r.Drills[0].Report.Shards {
		if !strings.HasPrefix(s.From, "ap-") || !s.RPOOK {
			t.Fatalf("a shard of the drill: %+v", s)
		}
	}
	if r.Check.Verified == 0 || r.Check.Mismatches != 0 || r.Check.Unreadable != 0 || r.Load.ClientErrors != 0 {
		t.Fatalf("check %+v, client errors %d %v", r.Check, r.Load.ClientErrors, r.Load.ErrorKinds)
	}
}
