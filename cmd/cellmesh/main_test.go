package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
)

var (
	update = flag.Bool("update", false, "rewrite the golden files in testdata/golden")
)

// exampleTopology is the topology the README and the CLI's help point at.
var exampleTopology = filepath.Join("..", "..", "examples", "topology", "three-regions.yaml")

// brokenTopology has many problems at once; see the comments in the file.
var brokenTopology = filepath.Join("testdata", "broken.yaml")

// callTimeout bounds one in-process run of the CLI.
const callTimeout = 30 * time.Second

// result is what one run of the CLI did.
type result struct {
	code           int
	stdout, stderr string
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// runCLI runs the CLI in-process and fails the test if it does not return
// within callTimeout.
func runCLI(t *testing.T, args ...string) result {
	t.Helper()
	var stdout, stderr bytes.Buffer
	done := make(chan int, 1)
	go func() { done <- run(args, &stdout, &stderr) }()
	timer := time.NewTimer(callTimeout)
	defer timer.Stop()
	select {
	case code := <-done:
		return result{code: code, stdout: stdout.String(), stderr: stderr.String()}
	case <-timer.C:
		t.Fatalf("cellmesh %q did not return within %v", args, callTimeout)
		return result{}
	}
}

// wantRun checks the exit code and that each output holds its substrings.
func wantRun(t *testing.T, r result, code int, stdoutHas, stderrHas []string) {
	t.Helper()
	if r.code != code {
		t.Errorf("exit code %d, want %d\n%s", r.code, code, r)
	}
	for _, s := range stdoutHas {
		if !strings.Contains(r.stdout, s) {
			t.Errorf("stdout lacks %q\n%s", s, r)
		}
	}
	for _, s := range stderrHas {
		if !strings.Contains(r.stderr, s) {
			t.Errorf("stderr lacks %q\n%s", s, r)
		}
	}
}

// checkGolden compares got with testdata/golden/NAME.txt, or rewrites the
// file under -update.
func checkGolden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", "golden", name+".txt")
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run 'go test ./cmd/cellmesh -run %s -update' to create it)", err, t.Name())
	}
	if diff := cmp.Diff(string(want), got); diff != "" {
		t.Errorf("output differs from %s (-want +got):\n%s\nrun with -update if the change is intended", path, diff)
	}
}

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// ---------------------------------------------------------------------------
// Help and usage.

func TestHelp(t *testing.T) {
	tests := []struct {
		name  string
		args  []string
		usage string   // the Usage line, a prefix of one stdout line
		flags []string // flags the help must list
	}{
		{"cellmesh", []string{"--help"}, "Usage: cellmesh <command> [flags]", nil},
		{"cellmesh-h", []string{"-h"}, "Usage: cellmesh <command> [flags]", nil},
		{"cellmesh-help-word", []string{"help"}, "Usage: cellmesh <command> [flags]", nil},
		{"route", []string{"route", "--help"}, "Usage: cellmesh route --topology FILE --uid ID",
			[]string{"-topology", "-uid", "-key-header", "-method", "-path", "-from", "-header"}},
		{"route-h-after-flags", []string{"route", "--topology", exampleTopology, "-h"}, "Usage: cellmesh route", nil},
		{"topology", []string{"topology", "--help"}, "Usage: cellmesh topology validate [--json] FILE", nil},
		{"topology-help-word", []string{"topology", "help"}, "Usage: cellmesh topology validate [--json] FILE", nil},
		{"topology-validate", []string{"topology", "validate", "--help"}, "Usage: cellmesh topology validate [--json] FILE", []string{"-json"}},
		{"topology-h", []string{"topology", "-h"}, "Usage: cellmesh topology validate [--json] FILE", nil},
		{"plan", []string{"plan", "--help"}, "Usage: cellmesh plan <kind> --topology FILE [flags]", nil},
		{"plan-h", []string{"plan", "-h"}, "Usage: cellmesh plan <kind> --topology FILE [flags]", nil},
		{"plan-help-word", []string{"plan", "help"}, "Usage: cellmesh plan <kind> --topology FILE [flags]", nil},
		{"plan-evacuate", []string{"plan", "evacuate", "--help"}, "Usage: cellmesh plan evacuate (--region R | --unit U)",
			[]string{"-topology", "-region", "-unit", "-load", "-json", "-write-topology", "-dry-run"}},
		{"plan-fail", []string{"plan", "fail", "--help"}, "Usage: cellmesh plan fail (--region R | --unit U[,U...])",
			[]string{"-topology", "-region", "-unit", "-load", "-json", "-write-topology", "-dry-run"}},
		{"plan-add-unit", []string{"plan", "add-unit", "--help"}, "Usage: cellmesh plan add-unit --name U --region R --capacity RPS",
			[]string{"-topology", "-name", "-region", "-capacity", "-kind", "-load", "-json", "-write-topology", "-dry-run"}},
		{"plan-remove-unit", []string{"plan", "remove-unit", "--help"}, "Usage: cellmesh plan remove-unit --unit U",
			[]string{"-topology", "-unit", "-load", "-json", "-write-topology", "-dry-run"}},
		{"plan-remove-unit-h", []string{"plan", "remove-unit", "-h"}, "Usage: cellmesh plan remove-unit --unit U", nil},
		{"controlplane", []string{"controlplane", "--help"}, "Usage: cellmesh controlplane --id ID --data-dir DIR",
			[]string{"-id", "-region", "-data-dir", "-raft", "-raft-advertise", "-api", "-xds", "-join", "-topology", "-token-file", "-insecure-dev", "-tls-ca", "-tls-cert", "-tls-key"}},
		{"status", []string{"status", "--help"}, "Usage: cellmesh status", []string{"-api", "-token", "-token-file", "-json", "-timeout"}},
		{"shards", []string{"shards", "--help"}, "Usage: cellmesh shards", []string{"-api", "-token", "-json", "-unit", "-region", "-state"}},
		{"move", []string{"move", "--help"}, "Usage: cellmesh move SHARD --to UNIT", []string{"-api", "-token", "-json", "-to", "-epoch"}},
		{"topology-get", []string{"topology", "get", "--help"}, "Usage: cellmesh topology get", []string{"-api", "-json"}},
		{"topology-apply", []string{"topology", "apply", "--help"}, "Usage: cellmesh topology apply FILE", []string{"-api", "-json"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, tt.args...)
			if r.code != exitOK {
				t.Errorf("exit code %d, want 0\n%s", r.code, r)
			}
			if r.stderr != "" {
				t.Errorf("help wrote to stderr:\n%s", r)
			}
			found := false
			for _, line := range strings.Split(r.stdout, "\n") {
				if strings.HasPrefix(line, tt.usage) {
					found = true
				}
			}
			if !found {
				t.Errorf("no stdout line starts with %q\n%s", tt.usage, r)
			}
			for _, f := range tt.flags {
				if !strings.Contains(r.stdout, "  "+f+" ") && !strings.Contains(r.stdout, "  "+f+"\n") {
					t.Errorf("help does not list flag %s\n%s", f, r)
				}
			}
		})
	}
}

func TestUsageErrors(t *testing.T) {
	ex := exampleTopology
	tests := []struct {
		name      string
		args      []string
		stderrHas []string
	}{
		{"no-args", nil, []string{"Usage: cellmesh <command> [flags]"}},
		{"unknown-command", []string{"bogus"}, []string{`unknown command "bogus"`, "Usage: cellmesh <command>"}},
		{"unknown-global-flag", []string{"--bogus"}, []string{`unknown command "--bogus"`}},
		{"route-unknown-flag", []string{"route", "--bogus"}, []string{"flag provided but not defined: -bogus", "Usage: cellmesh route"}},
		{"route-missing-topology", []string{"route", "--uid", "1"}, []string{"cellmesh route: --topology is required"}},
		{"route-extra-argument", []string{"route", "--topology", ex, "--uid", "1", "extra"}, []string{`unexpected argument "extra"`}},
		{"topology-no-subcommand", []string{"topology"}, []string{"Usage: cellmesh topology validate"}},
		{"topology-unknown-subcommand", []string{"topology", "bogus"}, []string{`unknown subcommand "bogus"`}},
		{"topology-validate-no-file", []string{"topology", "validate"}, []string{"want exactly one FILE, got 0 arguments"}},
		{"topology-validate-two-files", []string{"topology", "validate", ex, ex}, []string{"want exactly one FILE, got 2 arguments"}},
		{"topology-validate-unknown-flag", []string{"topology", "validate", "--bogus", ex}, []string{"flag provided but not defined: -bogus"}},
		{"plan-no-kind", []string{"plan"}, []string{"Usage: cellmesh plan <kind>"}},
		{"plan-unknown-kind", []string{"plan", "bogus", "--topology", ex}, []string{`unknown plan kind "bogus"`}},
		{"plan-evacuate-unknown-flag", []string{"plan", "evacuate", "--bogus"}, []string{"flag provided but not defined: -bogus", "Usage: cellmesh plan evacuate"}},
		{"plan-add-unit-has-no-unit-flag", []string{"plan", "add-unit", "--unit", "x"}, []string{"flag provided but not defined: -unit"}},
		{"plan-add-unit-bad-capacity", []string{"plan", "add-unit", "--topology", ex, "--name", "x", "--region", "us-east", "--capacity", "lots"}, []string{`invalid value "lots" for flag -capacity`}},
		{"plan-evacuate-missing-topology", []string{"plan", "evacuate", "--region", "eu-west"}, []string{"cellmesh plan evacuate: --topology is required"}},
		{"plan-fail-missing-topology", []string{"plan", "fail", "--unit", "ap-south-1"}, []string{"cellmesh plan fail: --topology is required"}},
		{"plan-add-unit-missing-topology", []string{"plan", "add-unit", "--name", "x", "--region", "us-east", "--capacity", "1"}, []string{"cellmesh plan add-unit: --topology is required"}},
		{"plan-remove-unit-missing-topology", []string{"plan", "remove-unit", "--unit", "eu-west-2"}, []string{"cellmesh plan remove-unit: --topology is required"}},
		{"plan-evacuate-no-target", []string{"plan", "evacuate", "--topology", ex}, []string{"give exactly one of --region or --unit"}},
		{"plan-evacuate-two-targets", []string{"plan", "evacuate", "--topology", ex, "--region", "eu-west", "--unit", "us-east-1"}, []string{"give exactly one of --region or --unit"}},
		{"plan-fail-no-target", []string{"plan", "fail", "--topology", ex}, []string{"give exactly one of --region or --unit"}},
		{"plan-remove-unit-no-unit", []string{"plan", "remove-unit", "--topology", ex}, []string{"--unit is required"}},
		{"plan-add-unit-no-region", []string{"plan", "add-unit", "--topology", ex, "--name", "x", "--capacity", "5"}, []string{"--name, --region and --capacity are required"}},
		{"plan-add-unit-no-capacity", []string{"plan", "add-unit", "--topology", ex, "--name", "x", "--region", "us-east"}, []string{"--name, --region and --capacity are required"}},
		{"plan-extra-argument", []string{"plan", "evacuate", "--topology", ex, "--region", "eu-west", "extra"}, []string{`unexpected argument "extra"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, tt.args...)
			wantRun(t, r, exitUsage, nil, tt.stderrHas)
			if r.stdout != "" {
				t.Errorf("a usage error wrote to stdout:\n%s", r)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// route.

// routeJSON is the output of `cellmesh route`.
type routeJSON struct {
	Shard  *int   `json:"shard"`
	Zone   string `json:"zone"`
	Unit   string `json:"unit"`
	Region string `json:"region"`
	Epoch  uint64 `json:"epoch"`
	State  string `json:"state"`
	Write  bool   `json:"write"`
	Key    string `json:"key,omitempty"`
}

func shardPtr(s int) *int { return &s }

// decodeRoute parses route's stdout strictly: no unknown field, "shard"
// always present (null when not user-sharded), nothing after the object.
func decodeRoute(t *testing.T, r result) routeJSON {
	t.Helper()
	var raw map[string]json.RawMessage
	if err := json.Unmarshal([]byte(r.stdout), &raw); err != nil {
		t.Fatalf("route output is not a JSON object: %v\n%s", err, r)
	}
	if _, ok := raw["shard"]; !ok {
		t.Errorf(`route output has no "shard" field\n%s`, r)
	}
	dec := json.NewDecoder(strings.NewReader(r.stdout))
	dec.DisallowUnknownFields()
	var out routeJSON
	if err := dec.Decode(&out); err != nil {
		t.Fatalf("decode route output: %v\n%s", err, r)
	}
	return out
}

// exampleAssignments are the shard ranges of examples/topology/three-regions.yaml,
// written out again so that the route tests do not take their expectation
// from the code they check. Change both together.
var exampleAssignments = []struct {
	lo, hi       int
	unit, region string
}{
	{0, 16, "us-east-1", "us-east"},
	{17, 33, "us-east-2", "us-east"},
	{34, 50, "eu-west-1", "eu-west"},
	{51, 67, "eu-west-2", "eu-west"},
	{68, 83, "ap-south-1", "ap-south"},
	{84, 99, "ap-south-2", "ap-south"},
}

// exampleRoute is the route the example topology gives a user shard.
func exampleRoute(t *testing.T, shard int, key string, write bool) routeJSON {
	t.Helper()
	for _, a := range exampleAssignments {
		if a.lo <= shard && shard <= a.hi {
			return routeJSON{Shard: shardPtr(shard), Zone: "rzone", Unit: a.unit, Region: a.region, Epoch: 1, State: "serving", Write: write, Key: key}
		}
	}
	t.Fatalf("shard %d is in no range of the example", shard)
	return routeJSON{}
}

// bigMod returns uid mod n, computed with math/big.
func bigMod(t *testing.T, uid string, n int64) int {
	t.Helper()
	v, ok := new(big.Int).SetString(uid, 10)
	if !ok {
		t.Fatalf("%q is not a decimal number", uid)
	}
	return int(new(big.Int).Mod(v, big.NewInt(n)).Int64())
}

// randomDigits returns a decimal string of n digits; the first is not 0.
func randomDigits(r *rand.Rand, n int) string {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte('0' + r.IntN(10))
	}
	if b[0] == '0' {
		b[0] = byte('1' + r.IntN(9))
	}
	return string(b)
}

// TestRouteModExample routes many user ids through the example topology
// (rule mod 100) by each of its key sources and checks the decision against
// uid mod 100 computed with math/big and the example's assignment ranges.
func TestRouteModExample(t *testing.T) {
	rng := rand.New(rand.NewPCG(2088, 123456789))
	uids := []string{
		"0", "1", "99", "100", "2088123456789",
		"000123",               // leading zeros: still 123
		"18446744073709551615", // 2^64-1
		"18446744073709551616", // 2^64
		strings.Repeat("9", 25),
		strings.Repeat("7", 40),
		randomDigits(rng, routing.MaxKeyLen), // the longest key accepted
	}
	for range 60 {
		uids = append(uids, randomDigits(rng, 1+rng.IntN(19)))
	}
	for range 140 {
		uids = append(uids, randomDigits(rng, 25+rng.IntN(60))) // 25 to 84 digits
	}
	for i, uid := range uids {
		var args []string
		source := []string{"header", "cookie", "query", "path"}[i%4]
		method := []string{"GET", "POST"}[rng.IntN(2)]
		switch source {
		case "header":
			args = []string{"--uid", uid, "--path", "/v1/orders"}
		case "cookie":
			args = []string{"--header", "Cookie: theme=dark; uid=" + uid, "--path", "/v1/orders"}
		case "query":
			args = []string{"--path", "/v1/accounts?x=1&uid=" + uid}
		case "path":
			args = []string{"--path", "/v1/users/" + uid + "/orders"}
		}
		args = append([]string{"route", "--topology", exampleTopology, "--method", method}, args...)
		r := runCLI(t, args...)
		if r.code != exitOK {
			t.Errorf("uid %s by %s: exit %d\n%s", uid, source, r.code, r)
			continue
		}
		want := exampleRoute(t, bigMod(t, uid, 100), uid, method == "POST")
		if diff := cmp.Diff(want, decodeRoute(t, r)); diff != "" {
			t.Errorf("uid %s by %s, %s: route differs (-want +got):\n%s", uid, source, method, diff)
		}
	}
}

func TestRouteExample(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want routeJSON
	}{
		{"header-default", []string{"--uid", "2088123456789"},
			routeJSON{Shard: shardPtr(89), Zone: "rzone", Unit: "ap-south-2", Region: "ap-south", Epoch: 1, State: "serving", Key: "2088123456789"}},
		{"header-explicit-key-header-any-case", []string{"--key-header", "X-CellMesh-UID", "--uid", "34"},
			routeJSON{Shard: shardPtr(34), Zone: "rzone", Unit: "eu-west-1", Region: "eu-west", Epoch: 1, State: "serving", Key: "34"}},
		{"header-by-header-flag", []string{"--header", "x-cellmesh-uid: 68"},
			routeJSON{Shard: shardPtr(68), Zone: "rzone", Unit: "ap-south-1", Region: "ap-south", Epoch: 1, State: "serving", Key: "68"}},
		{"header-wins-over-cookie", []string{"--uid", "5", "--header", "Cookie: uid=77"},
			routeJSON{Shard: shardPtr(5), Zone: "rzone", Unit: "us-east-1", Region: "us-east", Epoch: 1, State: "serving", Key: "5"}},
		{"cookie", []string{"--header", "Cookie: theme=dark; uid=777"},
			routeJSON{Shard: shardPtr(77), Zone: "rzone", Unit: "ap-south-1", Region: "ap-south", Epoch: 1, State: "serving", Key: "777"}},
		{"cookie-quoted", []string{"--header", `Cookie: uid="42"`},
			routeJSON{Shard: shardPtr(42), Zone: "rzone", Unit: "eu-west-1", Region: "eu-west", Epoch: 1, State: "serving", Key: "42"}},
		{"query", []string{"--path", "/v1/accounts?uid=55"},
			routeJSON{Shard: shardPtr(55), Zone: "rzone", Unit: "eu-west-2", Region: "eu-west", Epoch: 1, State: "serving", Key: "55"}},
		{"query-wins-over-path", []string{"--path", "/v1/users/2088123456789?uid=5"},
			routeJSON{Shard: shardPtr(5), Zone: "rzone", Unit: "us-east-1", Region: "us-east", Epoch: 1, State: "serving", Key: "5"}},
		{"path", []string{"--path", "/v1/users/12345/orders"},
			routeJSON{Shard: shardPtr(45), Zone: "rzone", Unit: "eu-west-1", Region: "eu-west", Epoch: 1, State: "serving", Key: "12345"}},
		{"path-last-segment", []string{"--path", "/v1/users/20"},
			routeJSON{Shard: shardPtr(20), Zone: "rzone", Unit: "us-east-2", Region: "us-east", Epoch: 1, State: "serving", Key: "20"}},
		{"path-write-lowercase-method", []string{"--method", "post", "--path", "/v1/users/3"},
			routeJSON{Shard: shardPtr(3), Zone: "rzone", Unit: "us-east-1", Region: "us-east", Epoch: 1, State: "serving", Write: true, Key: "3"}},
		{"gzone-post-config", []string{"--method", "POST", "--path", "/v1/config/x"},
			routeJSON{Zone: "gzone", Unit: "us-east-g", Region: "us-east", Epoch: 1, State: "serving", Write: true}},
		{"gzone-ignores-uid", []string{"--method", "PUT", "--path", "/v1/config/rates", "--uid", "42"},
			routeJSON{Zone: "gzone", Unit: "us-east-g", Region: "us-east", Epoch: 1, State: "serving", Write: true}},
		{"czone-get-config-from-rzone-unit", []string{"--path", "/v1/config/x", "--from", "eu-west-2"},
			routeJSON{Zone: "czone", Unit: "eu-west-c", Region: "eu-west", State: "serving"}},
		{"czone-head-config-from-gzone-unit", []string{"--method", "HEAD", "--path", "/v1/config/x", "--from", "us-east-g"},
			routeJSON{Zone: "czone", Unit: "us-east-c", Region: "us-east", State: "serving"}},
		{"czone-from-czone-unit", []string{"--path", "/v1/config/x", "--from", "ap-south-c"},
			routeJSON{Zone: "czone", Unit: "ap-south-c", Region: "ap-south", State: "serving"}},
		{"czone-fx-quote-post-is-a-read", []string{"--method", "POST", "--path", "/v1/fx/usd-eur/quote", "--from", "ap-south-1"},
			routeJSON{Zone: "czone", Unit: "ap-south-c", Region: "ap-south", State: "serving"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, append([]string{"route", "--topology", exampleTopology}, tt.args...)...)
			if r.code != exitOK {
				t.Fatalf("exit %d\n%s", r.code, r)
			}
			if r.stderr != "" {
				t.Errorf("stderr is not empty:\n%s", r)
			}
			if diff := cmp.Diff(tt.want, decodeRoute(t, r)); diff != "" {
				t.Errorf("route differs (-want +got):\n%s", diff)
			}
			if tt.want.Shard == nil && !strings.Contains(r.stdout, `"shard": null`) {
				t.Errorf(`a route that is not user-sharded must print "shard": null\n%s`, r)
			}
		})
	}
}

func TestRouteErrors(t *testing.T) {
	tests := []struct {
		name      string
		topology  string
		args      []string
		stderrHas []string
	}{
		{"czone-without-from", exampleTopology, []string{"--path", "/v1/config/x"}, []string{"cellmesh route: ", "czone", "local unit"}},
		{"from-unknown-unit", exampleTopology, []string{"--path", "/v1/config/x", "--from", "nosuch"}, []string{`--from: unit "nosuch" is not in the topology`}},
		{"non-numeric-uid", exampleTopology, []string{"--uid", "abc"}, []string{`user key "abc"`, "header x-cellmesh-uid", "not a decimal number"}},
		{"negative-uid", exampleTopology, []string{"--uid=-5"}, []string{`user key "-5"`, "not a decimal number"}},
		{"fractional-uid", exampleTopology, []string{"--uid", "1.5"}, []string{`user key "1.5"`, "not a decimal number"}},
		{"non-numeric-path-key", exampleTopology, []string{"--path", "/v1/users/alice"}, []string{`user key "alice"`, "path /v1/users/{key}", "not a decimal number"}},
		{"other-key-header", exampleTopology, []string{"--key-header", "x-other-uid", "--uid", "12"}, []string{"no user key"}},
		{"no-key", exampleTopology, []string{"--path", "/v1/orders"}, []string{"no user key"}},
		{"ambiguous-key", exampleTopology, []string{"--uid", "5", "--header", "x-cellmesh-uid: 6"}, []string{"more than once with different values"}},
		{"key-too-long", exampleTopology, []string{"--uid", strings.Repeat("1", routing.MaxKeyLen+1)}, []string{"too long"}},
		{"path-not-absolute", exampleTopology, []string{"--uid", "1", "--path", "v1/users"}, []string{`--path "v1/users" is not a request path`}},
		{"bad-method", exampleTopology, []string{"--uid", "1", "--method", "GE T"}, []string{`--method "GE T" is not an HTTP method`}},
		{"bad-header", exampleTopology, []string{"--uid", "1", "--header", "NoColon"}, []string{`--header "NoColon": want 'Name: value'`}},
		{"invalid-topology", brokenTopology, []string{"--uid", "1"}, []string{"invalid topology", "cellmesh topology validate " + brokenTopology}},
		{"missing-topology-file", filepath.Join("testdata", "nonexistent.yaml"), []string{"--uid", "1"}, []string{"read topology", "nonexistent.yaml", "no such file"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, append([]string{"route", "--topology", tt.topology}, tt.args...)...)
			wantRun(t, r, exitError, nil, tt.stderrHas)
			if r.stdout != "" {
				t.Errorf("a failed route wrote to stdout:\n%s", r)
			}
		})
	}
}

// ruleTopology returns a valid topology of n >= 4 shards under the given
// shard_rule (YAML flow mapping), with no key list (so the key is the
// x-cellmesh-uid header) and no zone rules. Shards are split into four
// ranges owned in turn by units[0..3]; ruleOwner gives the owner of a shard.
func ruleTopology(n int, rule string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "version: 3\nshards: %d\nshard_rule: %s\n", n, rule)
	b.WriteString("regions: [{name: west}, {name: east}]\nunits:\n")
	for _, u := range ruleUnits {
		fmt.Fprintf(&b, "  - {name: %s, region: %s, kind: rzone, capacity_rps: 1000}\n", u.name, u.region)
	}
	b.WriteString("assignments:\n")
	for i, u := range ruleUnits {
		lo, hi := i*n/4, (i+1)*n/4-1
		fmt.Fprintf(&b, "  - {shards: %d-%d, primary: %s, standbys: [%s], epoch: %d}\n", lo, hi, u.name, u.standby, i+1)
	}
	return b.String()
}

var ruleUnits = []struct{ name, region, standby string }{
	{"west-1", "west", "east-1"},
	{"west-2", "west", "east-2"},
	{"east-1", "east", "west-1"},
	{"east-2", "east", "west-2"},
}

func ruleRoute(n, shard int, key string) routeJSON {
	i := 0
	for i < 3 && (i+1)*n/4 <= shard {
		i++
	}
	u := ruleUnits[i]
	return routeJSON{Shard: shardPtr(shard), Zone: "rzone", Unit: u.name, Region: u.region, Epoch: uint64(i + 1), State: "serving", Key: key}
}

// TestRouteDigitsRule checks the digits rule [3, 2] (the 3rd- and
// 2nd-to-last digits) against (uid / 10) mod 100 mod N computed with
// math/big.
func TestRouteDigitsRule(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 2))
	uids := []string{"0", "5", "42", "123", "2088123456789", "000123", strings.Repeat("9", 30)}
	for range 40 {
		uids = append(uids, randomDigits(rng, 1+rng.IntN(40)))
	}
	for _, n := range []int{100, 64} {
		t.Run(strconv.Itoa(n), func(t *testing.T) {
			topo := writeFile(t, t.TempDir(), "digits.yaml", ruleTopology(n, "{kind: digits, digits: [3, 2]}"))
			for _, uid := range uids {
				v, _ := new(big.Int).SetString(uid, 10)
				v.Div(v, big.NewInt(10))
				want := ruleRoute(n, bigMod(t, v.String(), 100)%n, uid)
				r := runCLI(t, "route", "--topology", topo, "--uid", uid)
				if r.code != exitOK {
					t.Errorf("uid %s: exit %d\n%s", uid, r.code, r)
					continue
				}
				if diff := cmp.Diff(want, decodeRoute(t, r)); diff != "" {
					t.Errorf("uid %s: route differs (-want +got):\n%s", uid, diff)
				}
			}
			r := runCLI(t, "route", "--topology", topo, "--uid", "12x")
			wantRun(t, r, exitError, nil, []string{`user key "12x"`, "not a decimal number"})
		})
	}
}

// TestRouteHashRule checks the hash rule against xxhash64(key) mod N.
func TestRouteHashRule(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@._-+"
	keys := []string{
		"alice@example.com", "zoë@example.com", "2088123456789", "0",
		"6ba7b810-9dad-11d1-80b4-00c04fd430c8",
		strings.Repeat("k", routing.MaxKeyLen),
	}
	for range 40 {
		b := make([]byte, 1+rng.IntN(64))
		for i := range b {
			b[i] = alphabet[rng.IntN(len(alphabet))]
		}
		keys = append(keys, string(b))
	}
	for _, n := range []int{7, 100, routing.MaxShards} {
		t.Run(strconv.Itoa(n), func(t *testing.T) {
			topo := writeFile(t, t.TempDir(), "hash.yaml", ruleTopology(n, "{kind: hash}"))
			keys := keys
			if n == routing.MaxShards {
				keys = keys[:10] // each run loads 65,536 shards: slow under -race
			}
			for _, key := range keys {
				want := ruleRoute(n, int(xxhash.Sum64String(key)%uint64(n)), key)
				r := runCLI(t, "route", "--topology", topo, "--uid", key)
				if r.code != exitOK {
					t.Errorf("key %q: exit %d\n%s", key, r.code, r)
					continue
				}
				if diff := cmp.Diff(want, decodeRoute(t, r)); diff != "" {
					t.Errorf("key %q: route differs (-want +got):\n%s", key, diff)
				}
			}
			r := runCLI(t, "route", "--topology", topo, "--uid", strings.Repeat("k", routing.MaxKeyLen+1))
			wantRun(t, r, exitError, nil, []string{"too long"})
		})
	}
}

// ---------------------------------------------------------------------------
// topology validate.

// validateJSON is the output of `cellmesh topology validate --json`.
type validateJSON struct {
	Valid    bool `json:"valid"`
	Problems []struct {
		Subject string `json:"subject"`
		Message string `json:"message"`
	} `json:"problems"`
	Summary string `json:"summary"`
}

// decodeValidate parses the --json output strictly and checks that the
// problems use the documented lowercase keys.
func decodeValidate(t *testing.T, r result) validateJSON {
	t.Helper()
	var raw struct {
		Problems []map[string]any `json:"problems"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &raw); err != nil {
		t.Fatalf("validate --json output is not JSON: %v\n%s", err, r)
	}
	for _, p := range raw.Problems {
		if _, ok := p["subject"]; !ok || len(p) != 2 {
			t.Errorf(`problem %v: want exactly the keys "subject" and "message"`, p)
		} else if _, ok := p["message"]; !ok {
			t.Errorf(`problem %v: want exactly the keys "subject" and "message"`, p)
		}
	}
	dec := json.NewDecoder(strings.NewReader(r.stdout))
	dec.DisallowUnknownFields()
	var out validateJSON
	if err := dec.Decode(&out); err != nil {
		t.Fatalf("decode validate --json output: %v\n%s", err, r)
	}
	return out
}

func TestTopologyValidateExample(t *testing.T) {
	r := runCLI(t, "topology", "validate", exampleTopology)
	want := exampleTopology + ": valid (3 regions, 11 units, 100 shards, version 1)\n"
	if r.code != exitOK || r.stdout != want || r.stderr != "" {
		t.Errorf("want exit 0 and stdout %q\n%s", want, r)
	}

	r = runCLI(t, "topology", "validate", "--json", exampleTopology)
	if r.code != exitOK {
		t.Fatalf("--json: exit %d\n%s", r.code, r)
	}
	got := decodeValidate(t, r)
	if !got.Valid || len(got.Problems) != 0 || got.Summary != "3 regions, 11 units, 100 shards, version 1" {
		t.Errorf("--json: got %+v\n%s", got, r)
	}
	if !strings.Contains(r.stdout, `"problems": []`) {
		t.Errorf(`--json: a valid topology must print "problems": [], not null\n%s`, r)
	}
}

// brokenProblems are the problems testdata/broken.yaml was written to have.
var brokenProblems = []string{
	`version: version must be 1 or more`,
	`shard_rule: digit position 1 is listed twice`,
	`safety: max_utilization 1.5 must be in (0, 1]`,
	`region "us-east": declared twice`,
	`region "empty-region": has no unit`,
	`unit "us-east-1": declared twice`,
	`unit "mars-1": region "mars" is not declared`,
	`unit "us-east-q": kind "qzone" is unknown (want rzone, gzone or czone)`,
	`unit "us-east-2": capacity_rps 0 must be a positive request rate`,
	`shard 3: assigned twice`,
	`shard 4: has no primary`,
	`shard 5: primary "nobody" is not a declared unit`,
	`shard 6: standby "us-east-1" is also the primary`,
	`shard 7: primary "us-east-g" is a gzone unit; this assignment needs a rzone unit`,
	`shard 8: state "sleeping" is unknown (want serving, draining or blocked)`,
	`shard 9: has no primary`,
	`global: more than one gzone writer: the global assignment is declared 2 times`,
}

func TestTopologyValidateBroken(t *testing.T) {
	r := runCLI(t, "topology", "validate", brokenTopology)
	if r.code != exitError {
		t.Errorf("exit %d, want 1\n%s", r.code, r)
	}
	lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
	for _, p := range brokenProblems {
		if !slices.Contains(lines, "  "+p) {
			t.Errorf("no line %q\n%s", "  "+p, r)
		}
	}
	if head := fmt.Sprintf("%s: invalid, %d problem(s):", brokenTopology, len(lines)-1); lines[0] != head {
		t.Errorf("first line %q, want %q (the count must match the lines listed)", lines[0], head)
	}

	r = runCLI(t, "topology", "validate", "--json", brokenTopology)
	if r.code != exitError {
		t.Errorf("--json: exit %d, want 1\n%s", r.code, r)
	}
	got := decodeValidate(t, r)
	if got.Valid {
		t.Errorf("--json: valid is true for a broken topology")
	}
	var listed []string
	for _, p := range got.Problems {
		listed = append(listed, p.Subject+": "+p.Message)
	}
	for _, p := range brokenProblems {
		if !slices.Contains(listed, p) {
			t.Errorf("--json: problem %q missing; got %q", p, listed)
		}
	}
	if len(got.Problems) != len(lines)-1 {
		t.Errorf("--json lists %d problems, the text %d", len(got.Problems), len(lines)-1)
	}
}

func TestTopologyValidateMalformed(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "a-directory.yaml"), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		content string // written to NAME.yaml; "" with file set uses file
		file    string
		want    []string
	}{
		{name: "tab-indent", content: "version: 1\nregions:\n\t- name: a\n", want: []string{"line 3", "cannot start any token"}},
		{name: "unknown-key", content: "version: 1\nshards: 10\nbogus_key: 3\n", want: []string{"line 3", "unknown key bogus_key at the top level"}},
		{name: "unknown-nested-key", content: "version: 1\nunits:\n  - {name: a, region: r, kind: rzone, capacity_rps: 10, color: red}\n", want: []string{"line 3", "unknown key color in a unit"}},
		{name: "wrong-type", content: "version: 1\nshards: ten\n", want: []string{"line 2", "shards: want a whole number", "ten"}},
		{name: "wrong-type-list", content: "version: 1\nregions: us-east\n", want: []string{"line 2", "cannot unmarshal"}},
		{name: "two-documents", content: "version: 1\n---\nversion: 2\n", want: []string{"more than one document"}},
		{name: "empty", content: "\n", want: []string{"empty topology"}},
		{name: "whitespace-only", content: "  \n\n   \n", want: []string{"empty topology"}},
		{name: "syntax-error", content: "version: [1\n", want: []string{"line 1"}},
		{name: "top-level-list", content: "- a\n- b\n", want: []string{"line 1", "cannot unmarshal !!seq"}},
		{name: "shard-range-backwards", content: "version: 1\nassignments:\n  - {shards: 5-2, primary: a}\n", want: []string{"line 3", `range "5-2" ends before it starts`}},
		{name: "shard-not-a-number", content: "version: 1\nassignments:\n  - {shards: x, primary: a}\n", want: []string{"line 3", `"x" is not a shard number`}},
		{name: "key-source-unknown-key", content: "version: 1\nkey:\n  - {header: a, colour: b}\n", want: []string{"line 3", "unknown key colour in a key entry"}},
		{name: "key-source-two-kinds", content: "version: 1\nkey:\n  - {header: a, cookie: b}\n", want: []string{"line 3", "give exactly one of header, cookie, query or path"}},
		{name: "nonexistent", file: filepath.Join(dir, "nonexistent.yaml"), want: []string{"nonexistent.yaml", "no such file or directory"}},
		{name: "directory", file: filepath.Join(dir, "a-directory.yaml"), want: []string{"a-directory.yaml", "is a directory"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := tt.file
			if path == "" {
				path = writeFile(t, dir, tt.name+".yaml", tt.content)
			}
			r := runCLI(t, "topology", "validate", path)
			wantRun(t, r, exitError, append([]string{path + ": invalid, 1 problem(s):", "  file: "}, tt.want...), nil)

			r = runCLI(t, "topology", "validate", "--json", path)
			if r.code != exitError {
				t.Errorf("--json: exit %d, want 1\n%s", r.code, r)
			}
			got := decodeValidate(t, r)
			if got.Valid || len(got.Problems) != 1 || got.Problems[0].Subject != "file" {
				t.Fatalf("--json: want valid=false and one problem about the file, got %+v", got)
			}
			for _, w := range tt.want {
				if !strings.Contains(got.Problems[0].Message, w) {
					t.Errorf("--json: message %q lacks %q", got.Problems[0].Message, w)
				}
			}

			// Commands that load a topology report the same problem.
			r = runCLI(t, "route", "--topology", path, "--uid", "1")
			wantRun(t, r, exitError, nil, tt.want)
		})
	}
}

// ---------------------------------------------------------------------------
// plan.

type planCase struct {
	name string
	args []string // after "plan", without --topology
	code int
	// plan computes the same plan through the routing package.
	plan func(m *routing.ShardMap, obs routing.Observed) (*routing.Plan, error)
	load map[string]float64
}

var planCases = []planCase{
	{
		name: "evacuate-region-eu-west",
		args: []string{"evacuate", "--region", "eu-west", "--load", "eu-west-1=12000,eu-west-2=9000", "--load", "us-east-1=10000"},
		load: map[string]float64{"eu-west-1": 12000, "eu-west-2": 9000, "us-east-1": 10000},
		plan: func(m *routing.ShardMap, obs routing.Observed) (*routing.Plan, error) {
			return routing.EvacuateRegion(m, "eu-west", obs)
		},
	},
	{
		name: "evacuate-unit-us-east-1",
		args: []string{"evacuate", "--unit", "us-east-1"},
		plan: func(m *routing.ShardMap, obs routing.Observed) (*routing.Plan, error) {
			return routing.EvacuateUnit(m, "us-east-1", obs)
		},
	},
	{
		name: "fail-region-us-east",
		args: []string{"fail", "--region", "us-east"},
		plan: func(m *routing.ShardMap, obs routing.Observed) (*routing.Plan, error) {
			return routing.FailRegion(m, "us-east", obs)
		},
	},
	{
		name: "fail-unit-ap-south-1",
		args: []string{"fail", "--unit", "ap-south-1"},
		plan: func(m *routing.ShardMap, obs routing.Observed) (*routing.Plan, error) {
			return routing.FailUnits(m, []string{"ap-south-1"}, obs)
		},
	},
	{
		name: "add-unit-us-east-3",
		args: []string{"add-unit", "--name", "us-east-3", "--region", "us-east", "--capacity", "40000"},
		plan: func(m *routing.ShardMap, obs routing.Observed) (*routing.Plan, error) {
			return routing.AddUnit(m, routing.Unit{Name: "us-east-3", Region: "us-east", Kind: routing.KindRZone, CapacityRPS: 40000}, obs)
		},
	},
	{
		name: "remove-unit-eu-west-2",
		args: []string{"remove-unit", "--unit", "eu-west-2"},
		plan: func(m *routing.ShardMap, obs routing.Observed) (*routing.Plan, error) {
			return routing.RemoveUnit(m, "eu-west-2", obs)
		},
	},
	{
		// Both standbys of us-east-1's shards are near their 80% limit:
		// eu-west-1 (the first standby) would carry 24000+39000 rps.
		name: "refused-evacuate-unit-us-east-1",
		args: []string{"evacuate", "--unit", "us-east-1", "--load", "us-east-1=39000,eu-west-1=24000,ap-south-1=20000"},
		code: exitRefused,
		load: map[string]float64{"us-east-1": 39000, "eu-west-1": 24000, "ap-south-1": 20000},
		plan: func(m *routing.ShardMap, obs routing.Observed) (*routing.Plan, error) {
			return routing.EvacuateUnit(m, "us-east-1", obs)
		},
	},
}

func (c planCase) cli(extra ...string) []string {
	args := append([]string{"plan"}, c.args...)
	args = append(args, "--topology", exampleTopology)
	return append(args, extra...)
}

func TestPlanGolden(t *testing.T) {
	for _, c := range planCases {
		t.Run(c.name, func(t *testing.T) {
			r := runCLI(t, c.cli()...)
			if r.code != c.code {
				t.Fatalf("exit %d, want %d\n%s", r.code, c.code, r)
			}
			checkGolden(t, c.name, r.stdout)
			if c.code == exitOK {
				if r.stderr != "" {
					t.Errorf("a passing plan wrote to stderr:\n%s", r)
				}
				passes := strings.HasSuffix(r.stdout, "result: passes every safety rule\n") ||
					strings.Contains(r.stdout, "WARN") && strings.Contains(r.stdout, "result: passes the safety rules, with ")
				if !passes || strings.Contains(r.stdout, "BROKEN") {
					t.Errorf("a passing plan must end with 'result: passes ...' and break no rule\n%s", r)
				}
			}
		})
	}
}

func TestPlanRefused(t *testing.T) {
	c := planCases[len(planCases)-1]
	r := runCLI(t, c.cli()...)
	wantRun(t, r, exitRefused,
		[]string{"  BROKEN capacity-headroom ", "result: refused; nothing was changed\n"},
		[]string{
			"cellmesh plan evacuate: plan evacuate-unit us-east-1 refused: ",
			"capacity-headroom: eu-west-1 would carry 63000 rps, 210.0% of its 30000 rps capacity; the limit is 80%",
		})
	if n := strings.Count(r.stdout, "BROKEN"); n != 1 {
		t.Errorf("%d rules broken, want only capacity-headroom\n%s", n, r)
	}
}

// TestPlanJSON checks that --json prints a routing.Plan, the same plan the
// routing package computes for the same flags.
func TestPlanJSON(t *testing.T) {
	topo, err := topofile.Load(exampleTopology)
	if err != nil {
		t.Fatal(err)
	}
	m, err := routing.Compile(topo)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range planCases {
		t.Run(c.name, func(t *testing.T) {
			r := runCLI(t, c.cli("--json")...)
			if r.code != c.code {
				t.Fatalf("exit %d, want %d\n%s", r.code, c.code, r)
			}
			dec := json.NewDecoder(strings.NewReader(r.stdout))
			dec.DisallowUnknownFields()
			var got routing.Plan
			if err := dec.Decode(&got); err != nil {
				t.Fatalf("decode plan: %v\n%s", err, r)
			}
			load := c.load
			if load == nil {
				load = map[string]float64{}
			}
			want, err := c.plan(m, routing.Observed{LoadRPS: load})
			var refused *routing.RefusedError
			if err != nil && !errors.As(err, &refused) {
				t.Fatalf("routing: %v", err)
			}
			if diff := cmp.Diff(want, &got); diff != "" {
				t.Errorf("--json plan differs from the routing package's (-want +got):\n%s", diff)
			}
			if got.Refused() != (c.code == exitRefused) {
				t.Errorf("Refused() = %v with exit %d", got.Refused(), r.code)
			}
			// Invariants of any plan: waves are filled in order and hold at
			// most max_shards_in_flight (10) moves; a new primary bumps the
			// epoch by one.
			perWave := map[int]int{}
			for i, mv := range got.Moves {
				perWave[mv.Wave]++
				if mv.Wave < 1 || mv.Wave > got.Waves || (i > 0 && mv.Wave < got.Moves[i-1].Wave) {
					t.Errorf("move %d (%s): wave %d of %d out of order", i, routing.ShardName(mv.Shard), mv.Wave, got.Waves)
				}
				wantTo := mv.FromEpoch
				if mv.PrimaryChange() {
					wantTo++
				}
				if mv.ToEpoch != wantTo {
					t.Errorf("move %d (%s): epoch %d -> %d, want %d", i, routing.ShardName(mv.Shard), mv.FromEpoch, mv.ToEpoch, wantTo)
				}
			}
			for w, n := range perWave {
				if n > 10 {
					t.Errorf("wave %d moves %d shards, the example's limit is 10", w, n)
				}
			}
		})
	}
}

// TestPlanWriteTopology checks that --write-topology writes the topology the
// plan leads to: valid, version 2, every move applied and nothing else
// changed.
func TestPlanWriteTopology(t *testing.T) {
	before, err := topofile.Load(exampleTopology)
	if err != nil {
		t.Fatal(err)
	}
	var cases []planCase
	for _, c := range planCases {
		if c.code == exitOK {
			cases = append(cases, c)
		}
	}
	// Failing either gzone region leaves the writer without a live standby
	// elsewhere; the written topology must still validate.
	cases = append(cases,
		planCase{name: "fail-region-eu-west", args: []string{"fail", "--region", "eu-west"}},
		planCase{name: "fail-region-ap-south", args: []string{"fail", "--region", "ap-south"}},
		planCase{name: "fail-unit-us-east-g", args: []string{"fail", "--unit", "us-east-g"}},
		planCase{name: "add-unit-gzone", args: []string{"add-unit", "--name", "ap-south-g", "--region", "ap-south", "--capacity", "20000", "--kind", "gzone"}},
		// A unit in a region the topology lacks declares the region and
		// becomes the cross-region standby where a shard had none.
		planCase{name: "add-unit-new-region", args: []string{"add-unit", "--name", "sa-east-1", "--region", "sa-east", "--capacity", "30000"}},
	)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "after.yaml")
			r := runCLI(t, c.cli("--json", "--write-topology", out)...)
			wantRun(t, r, exitOK, nil, []string{"wrote the topology after the plan (version 2) to " + out})
			var plan routing.Plan
			if err := json.Unmarshal([]byte(r.stdout), &plan); err != nil {
				t.Fatalf("decode plan: %v\n%s", err, r)
			}

			v := runCLI(t, "topology", "validate", out)
			wantRun(t, v, exitOK, []string{out + ": valid (", "version 2)"}, nil)

			after, err := topofile.Load(out)
			if err != nil {
				t.Fatal(err)
			}
			if after.Version != before.Version+1 {
				t.Errorf("version %d, want %d", after.Version, before.Version+1)
			}
			wantAssign := map[int]routing.Assignment{}
			for _, a := range before.Assignments {
				wantAssign[a.Shard] = a
			}
			for _, mv := range plan.Moves {
				a := wantAssign[mv.Shard]
				a.Primary, a.Standbys, a.Epoch = mv.To, mv.Standbys, mv.ToEpoch
				wantAssign[mv.Shard] = a
			}
			gotAssign := map[int]routing.Assignment{}
			for _, a := range after.Assignments {
				gotAssign[a.Shard] = a
			}
			if diff := cmp.Diff(wantAssign, gotAssign, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("assignments after the plan (-want +got):\n%s", diff)
			}

			wantUnits := slices.Clone(before.Units)
			if plan.AddUnit != nil {
				wantUnits = append(wantUnits, *plan.AddUnit)
			}
			wantUnits = slices.DeleteFunc(wantUnits, func(u routing.Unit) bool { return u.Name == plan.RemoveUnit })
			if diff := cmp.Diff(wantUnits, after.Units); diff != "" {
				t.Errorf("units after the plan (-want +got):\n%s", diff)
			}
		})
	}
}

// TestPlanWriteTopologyRoute routes through a topology that a plan wrote:
// after evacuating eu-west, shard 34 is led by ap-south-1 at epoch 2.
func TestPlanWriteTopologyRoute(t *testing.T) {
	out := filepath.Join(t.TempDir(), "after.yaml")
	r := runCLI(t, planCases[0].cli("--write-topology", out)...)
	wantRun(t, r, exitOK, nil, nil)
	r = runCLI(t, "route", "--topology", out, "--uid", "1234")
	if r.code != exitOK {
		t.Fatalf("route: exit %d\n%s", r.code, r)
	}
	want := routeJSON{Shard: shardPtr(34), Zone: "rzone", Unit: "ap-south-1", Region: "ap-south", Epoch: 2, State: "serving", Key: "1234"}
	if diff := cmp.Diff(want, decodeRoute(t, r)); diff != "" {
		t.Errorf("route after the plan differs (-want +got):\n%s", diff)
	}
}

func TestPlanWriteTopologyRefusedWritesNothing(t *testing.T) {
	c := planCases[len(planCases)-1]
	out := filepath.Join(t.TempDir(), "after.yaml")
	r := runCLI(t, c.cli("--write-topology", out)...)
	wantRun(t, r, exitRefused, nil, []string{"refused"})
	if strings.Contains(r.stderr, "wrote") {
		t.Errorf("a refused plan says it wrote a topology:\n%s", r)
	}
	if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused plan wrote %s (stat: %v)", out, err)
	}
}

func TestPlanWriteTopologyUnwritable(t *testing.T) {
	out := filepath.Join(t.TempDir(), "no-such-dir", "after.yaml")
	r := runCLI(t, planCases[1].cli("--write-topology", out)...)
	wantRun(t, r, exitError, []string{"result: passes every safety rule"}, []string{"cellmesh plan evacuate: write topology:", "no-such-dir"})
}

func TestPlanBadInput(t *testing.T) {
	tests := []struct {
		name      string
		args      []string // after "plan", without --topology
		code      int
		stderrHas []string
	}{
		// A malformed --load value and a unit the topology lacks are both
		// bad input (exit 1).
		{"load-no-equals", []string{"evacuate", "--region", "eu-west", "--load", "x"}, exitError, []string{`--load "x": want UNIT=RPS`}},
		{"load-negative", []string{"evacuate", "--region", "eu-west", "--load", "u=-1"}, exitError, []string{`--load "u=-1": want UNIT=RPS with a non-negative rate`}},
		{"load-not-a-number", []string{"evacuate", "--region", "eu-west", "--load", "us-east-1=lots"}, exitError, []string{`--load "us-east-1=lots"`}},
		{"load-nan", []string{"evacuate", "--region", "eu-west", "--load", "us-east-1=NaN"}, exitError, []string{`--load "us-east-1=NaN"`}},
		{"load-too-large", []string{"evacuate", "--region", "eu-west", "--load", "us-east-1=1e13"}, exitError, []string{`--load "us-east-1=1e13"`}},
		{"load-no-unit", []string{"fail", "--unit", "ap-south-1", "--load", "=5"}, exitError, []string{`--load "=5"`}},
		{"load-unknown-unit", []string{"evacuate", "--region", "eu-west", "--load", "nosuch=5"}, exitError, []string{`--load: units nosuch are not in the topology`}},
		{"evacuate-unknown-region", []string{"evacuate", "--region", "nowhere"}, exitError, []string{`cellmesh plan evacuate: region "nowhere" is not in the topology`}},
		{"evacuate-unknown-unit", []string{"evacuate", "--unit", "nosuch"}, exitError, []string{`cellmesh plan evacuate: unit "nosuch" is not in the topology`}},
		{"fail-unknown-region", []string{"fail", "--region", "nowhere"}, exitError, []string{`cellmesh plan fail: region "nowhere" is not in the topology`}},
		{"fail-unknown-unit-in-list", []string{"fail", "--unit", "ap-south-1,nosuch"}, exitError, []string{`cellmesh plan fail: unit "nosuch" is not in the topology`}},
		{"remove-unknown-unit", []string{"remove-unit", "--unit", "nosuch"}, exitError, []string{`cellmesh plan remove-unit: unit "nosuch" is not in the topology`}},
		{"add-unit-bad-region-name", []string{"add-unit", "--name", "mars-1", "--region", "Mars_1", "--capacity", "100"}, exitError, []string{`region "Mars_1": invalid name`}},

		{"add-unit-existing-name", []string{"add-unit", "--name", "us-east-1", "--region", "us-east", "--capacity", "100"}, exitError, []string{`unit "us-east-1": declared twice`}},
		{"add-unit-bad-name", []string{"add-unit", "--name", "Bad_Name", "--region", "us-east", "--capacity", "100"}, exitError, []string{`unit "Bad_Name": invalid name`}},
		{"add-unit-bad-kind", []string{"add-unit", "--name", "us-east-3", "--region", "us-east", "--capacity", "100", "--kind", "qzone"}, exitError, []string{`kind "qzone" is unknown`}},
		{"add-unit-negative-capacity", []string{"add-unit", "--name", "us-east-3", "--region", "us-east", "--capacity", "-5"}, exitError, []string{"capacity_rps -5 must be a positive request rate"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, append(append([]string{"plan"}, tt.args...), "--topology", exampleTopology)...)
			wantRun(t, r, tt.code, nil, tt.stderrHas)
			if r.stdout != "" {
				t.Errorf("a plan that was not computed wrote to stdout:\n%s", r)
			}
		})
	}

	t.Run("invalid-topology", func(t *testing.T) {
		r := runCLI(t, "plan", "evacuate", "--region", "us-east", "--topology", brokenTopology)
		wantRun(t, r, exitError, nil, []string{"invalid topology", "cellmesh topology validate " + brokenTopology})
	})
}

// ---------------------------------------------------------------------------
// Regressions: CLI bugs found by review, each pinned by the behavior we want.

// route --header splits its value at commas (it is a multiFlag, like
// --load), so a header whose value holds a comma is refused.
func TestCLIHeaderWithComma(t *testing.T) {
	r := runCLI(t, "route", "--topology", exampleTopology, "--uid", "5", "--header", "Accept: text/html, application/json")
	wantRun(t, r, exitOK, []string{`"unit": "us-east-1"`}, nil)
}

// Every level accepts -h, --help and -help except `topology -help` and
// `plan -help`, which are taken for an unknown subcommand or plan kind.
func TestCLISingleDashHelp(t *testing.T) {
	for _, cmd := range []string{"topology", "plan"} {
		r := runCLI(t, cmd, "-help")
		wantRun(t, r, exitOK, []string{"Usage: cellmesh " + cmd}, nil)
	}
}

// plan fail --unit A --unit B silently plans the failure of B only.
func TestCLIFailRepeatedUnit(t *testing.T) {
	r := runCLI(t, "plan", "fail", "--topology", exampleTopology, "--unit", "us-east-1", "--unit", "ap-south-1")
	if r.code == exitUsage {
		return // refusing the repeated flag is fine too
	}
	wantRun(t, r, exitOK, []string{"lost: us-east-1, ap-south-1\n"}, nil)
}

// The plan JSON is snake_case except add_unit, a routing.Unit without JSON
// tags ("Name", "CapacityRPS").
func TestCLIAddUnitJSONKeys(t *testing.T) {
	r := runCLI(t, planCases[4].cli("--json")...)
	var raw struct {
		AddUnit map[string]any `json:"add_unit"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &raw); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"name", "region", "kind", "capacity_rps"} {
		if _, ok := raw.AddUnit[k]; !ok {
			t.Errorf("add_unit has no key %q: %v", k, raw.AddUnit)
		}
	}
}

// The czone error does not say which flag is missing.
func TestCLICZoneMessageNamesFrom(t *testing.T) {
	r := runCLI(t, "route", "--topology", exampleTopology, "--path", "/v1/config/x")
	wantRun(t, r, exitError, nil, []string{"--from"})
}

// With two unknown units in --load, which one the error names depends on map
// iteration order.
func TestCLILoadUnknownUnitsDeterministic(t *testing.T) {
	first := runCLI(t, "plan", "evacuate", "--region", "eu-west", "--topology", exampleTopology, "--load", "a=1,b=2,c=3").stderr
	for range 20 {
		if got := runCLI(t, "plan", "evacuate", "--region", "eu-west", "--topology", exampleTopology, "--load", "a=1,b=2,c=3").stderr; got != first {
			t.Fatalf("stderr changed between runs: %q then %q", first, got)
		}
	}
}

// A file holding only a comment is reported as "decode YAML: EOF".
func TestCLICommentOnlyFile(t *testing.T) {
	path := writeFile(t, t.TempDir(), "comment.yaml", "# nothing yet\n")
	r := runCLI(t, "topology", "validate", path)
	wantRun(t, r, exitError, []string{"empty topology"}, nil)
}

// ---------------------------------------------------------------------------
// Regressions from the second review: each test failed before its fix.

// A flag value of "-h" is a value, not a request for help; help is still
// found anywhere a flag may stand, after positional arguments too.
func TestCLIHelpIsAFlagNotAValue(t *testing.T) {
	tests := []struct {
		name      string
		args      []string
		code      int
		stdoutHas []string
		stderrHas []string
	}{
		{"route-path-value", []string{"route", "--topology", exampleTopology, "--path", "-h", "--uid", "5"},
			exitError, nil, []string{`--path "-h" is not a request path`}},
		{"route-uid-value-help", []string{"route", "--topology", exampleTopology, "--uid", "--help"},
			exitError, nil, []string{`user key "--help"`, "not a decimal number"}},
		{"plan-region-value", []string{"plan", "evacuate", "--topology", exampleTopology, "--region", "-h"},
			exitError, nil, []string{`region "-h" is not in the topology`}},
		{"plan-fail-unit-value", []string{"plan", "fail", "--topology", exampleTopology, "--unit", "-help"},
			exitError, nil, []string{`unit "-help" is not in the topology`}},
		{"validate-help-after-file", []string{"topology", "validate", exampleTopology, "--help"},
			exitOK, []string{"Usage: cellmesh topology validate [--json] FILE"}, nil},
		{"validate-h-after-double-dash-is-a-file", []string{"topology", "validate", "--", "-h"},
			exitError, []string{"-h: invalid, 1 problem(s):"}, nil},
		{"plan-help-after-flags", []string{"plan", "fail", "--unit", "us-east-1", "-help"},
			exitOK, []string{"Usage: cellmesh plan fail"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, tt.args...)
			wantRun(t, r, tt.code, tt.stdoutHas, tt.stderrHas)
			if tt.code == exitOK && r.stderr != "" {
				t.Errorf("help wrote to stderr:\n%s", r)
			}
			if tt.code != exitOK && strings.Contains(r.stdout, "Usage:") {
				t.Errorf("a flag value of -h printed help:\n%s", r)
			}
		})
	}
}

// --method must be an RFC 9110 token.
func TestRouteMethodToken(t *testing.T) {
	for _, m := range []string{"G(T", "GE T", "G,T", "G/T", `G"T`, "GÉT", "G:T", "G\tT", "G@T", "G{T}", "G?"} {
		t.Run("bad-"+m, func(t *testing.T) {
			r := runCLI(t, "route", "--topology", exampleTopology, "--uid", "1", "--method", m)
			wantRun(t, r, exitError, nil, []string{fmt.Sprintf("--method %q is not an HTTP method", m)})
			if r.stdout != "" {
				t.Errorf("a bad method routed:\n%s", r)
			}
		})
	}
	r := runCLI(t, "route", "--topology", exampleTopology, "--uid", "1", "--method=")
	wantRun(t, r, exitError, nil, []string{`--method "" is not an HTTP method`})
	for _, m := range []string{"M-SEARCH", "PROPFIND", "X!#$%&'*+-.^_`|~9"} {
		t.Run("good-"+m, func(t *testing.T) {
			r := runCLI(t, "route", "--topology", exampleTopology, "--uid", "1", "--method", m)
			if r.code != exitOK {
				t.Fatalf("exit %d\n%s", r.code, r)
			}
			if diff := cmp.Diff(exampleRoute(t, 1, "1", true), decodeRoute(t, r)); diff != "" {
				t.Errorf("route differs (-want +got):\n%s", diff)
			}
		})
	}
}

// --uid that the decision did not use is an error, not a silent fallback.
func TestRouteUIDNotRead(t *testing.T) {
	sources := "header x-cellmesh-uid, cookie uid, query uid, path /v1/users/{key}"
	tests := []struct {
		name      string
		args      []string
		stderrHas []string
	}{
		{"local-fallback", []string{"--uid", "42", "--key-header", "x-other", "--from", "us-east-1"},
			[]string{`--uid "42" was not read`, "header x-other", sources}},
		{"key-from-cookie", []string{"--uid", "42", "--key-header", "x-other", "--header", "Cookie: uid=77"},
			[]string{`--uid "42" was not read`, "header x-other", sources, `key "77" came from cookie uid`}},
		{"key-from-cookie-same-value", []string{"--uid", "42", "--key-header", "x-other", "--header", "Cookie: uid=42"},
			[]string{`--uid "42" was not read`, `key "42" came from cookie uid`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, append([]string{"route", "--topology", exampleTopology}, tt.args...)...)
			wantRun(t, r, exitError, nil, tt.stderrHas)
			if r.stdout != "" {
				t.Errorf("a route that ignored --uid wrote to stdout:\n%s", r)
			}
		})
	}

	// A topology that reads only a cookie never reads --uid's default header.
	topo := writeFile(t, t.TempDir(), "cookie.yaml",
		strings.Replace(ruleTopology(8, "{kind: mod}"), "regions:", "key:\n  - cookie: uid\nregions:", 1))
	r := runCLI(t, "route", "--topology", topo, "--uid", "5", "--from", "west-1")
	wantRun(t, r, exitError, nil, []string{`--uid "5" was not read`, "header x-cellmesh-uid", "reads the user key from cookie uid"})

	// --uid read, or not needed by the route: no error.
	for _, args := range [][]string{
		{"--uid", "42", "--from", "us-east-1"},
		{"--uid", " 42 ", "--key-header", "X-CellMesh-Uid"},
		{"--uid", "42", "--method", "PUT", "--path", "/v1/config/rates"},
		{"--uid", "42", "--path", "/v1/config/rates", "--from", "eu-west-1"},
	} {
		r := runCLI(t, append([]string{"route", "--topology", exampleTopology}, args...)...)
		wantRun(t, r, exitOK, nil, nil)
		if strings.Contains(r.stdout, "local_fallback") {
			t.Errorf("%q fell back to the local unit:\n%s", args, r)
		}
	}
}

// A unit given twice in --load is refused, naming the unit.
func TestPlanLoadGivenTwice(t *testing.T) {
	for _, loads := range [][]string{
		{"--load", "us-east-1=1", "--load", "us-east-1=2"},
		{"--load", "us-east-1=1,eu-west-1=3, us-east-1 =2"},
		{"--load", "us-east-1=1", "--load", "us-east-1=1"},
	} {
		args := append([]string{"plan", "evacuate", "--region", "eu-west", "--topology", exampleTopology}, loads...)
		r := runCLI(t, args...)
		wantRun(t, r, exitError, nil, []string{`--load: unit "us-east-1" is given twice`})
		if r.stdout != "" {
			t.Errorf("%q: a refused --load wrote a plan:\n%s", loads, r)
		}
	}
}

// Every plan kind takes --dry-run: the same plan and exit code, nothing
// written; --dry-run with --write-topology is a usage mistake.
func TestPlanDryRun(t *testing.T) {
	for _, c := range planCases {
		t.Run(c.name, func(t *testing.T) {
			plain := runCLI(t, c.cli()...)
			dry := runCLI(t, c.cli("--dry-run")...)
			if dry.code != plain.code || dry.stdout != plain.stdout || dry.stderr != plain.stderr {
				t.Errorf("--dry-run changed the output:\nwithout:\n%s\nwith:\n%s", plain, dry)
			}

			out := filepath.Join(t.TempDir(), "after.yaml")
			for _, args := range [][]string{
				c.cli("--dry-run", "--write-topology", out),
				c.cli("--write-topology", out, "--dry-run=true"),
			} {
				r := runCLI(t, args...)
				wantRun(t, r, exitUsage, nil, []string{"--dry-run writes nothing; drop one of them"})
				if r.stdout != "" {
					t.Errorf("a usage mistake printed a plan:\n%s", r)
				}
			}
			if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("--dry-run wrote %s (stat: %v)", out, err)
			}
		})
	}
	r := runCLI(t, "plan", "--help")
	wantRun(t, r, exitOK, []string{"--dry-run"}, nil)
}

func TestPlanDryRunGolden(t *testing.T) {
	r := runCLI(t, "plan", "fail", "--unit", "us-east-1", "--dry-run", "--topology", exampleTopology)
	if r.code != exitOK || r.stderr != "" {
		t.Fatalf("want exit 0 and no stderr\n%s", r)
	}
	checkGolden(t, "fail-unit-us-east-1-dry-run", r.stdout)
}

// The kind's help holds the shared description, not the kind list.
func TestPlanKindHelpAbout(t *testing.T) {
	for _, kind := range []string{"evacuate", "fail", "add-unit", "remove-unit"} {
		r := runCLI(t, "plan", kind, "--help")
		wantRun(t, r, exitOK, []string{"Usage: cellmesh plan " + kind + " ", "\n\n" + planAbout + "\n", "-dry-run"}, nil)
		if strings.Contains(r.stdout, "Kinds:") || strings.Contains(r.stdout, "<kind>") {
			t.Errorf("plan %s --help shows the kind list:\n%s", kind, r)
		}
	}
}

// --write-topology naming the --topology file (by any spelling or link)
// would overwrite the input and lose its comments.
func TestPlanWriteTopologySameFile(t *testing.T) {
	orig, err := os.ReadFile(exampleTopology)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	in := writeFile(t, dir, "topo.yaml", string(orig))
	abs, err := filepath.Abs(in)
	if err != nil {
		t.Fatal(err)
	}
	outs := map[string]string{
		"same":     in,
		"dot":      filepath.Join(dir, ".", "topo.yaml"),
		"dot-dot":  filepath.Join(dir, "sub", "..", "topo.yaml"),
		"absolute": abs,
	}
	if err := os.Symlink(in, filepath.Join(dir, "link.yaml")); err == nil {
		outs["symlink"] = filepath.Join(dir, "link.yaml")
	}
	if err := os.Link(in, filepath.Join(dir, "hard.yaml")); err == nil {
		outs["hard-link"] = filepath.Join(dir, "hard.yaml")
	}
	for name, out := range outs {
		t.Run(name, func(t *testing.T) {
			r := runCLI(t, "plan", "evacuate", "--region", "eu-west", "--topology", in, "--write-topology", out)
			wantRun(t, r, exitError, nil, []string{"--write-topology " + out + " is the --topology file", "write to another file"})
			if r.stdout != "" {
				t.Errorf("a refused --write-topology printed a plan:\n%s", r)
			}
			if got, err := os.ReadFile(in); err != nil || !bytes.Equal(got, orig) {
				t.Errorf("the input topology changed (read error %v)", err)
			}
		})
	}

	// Another file next to it is fine.
	out := filepath.Join(dir, "after.yaml")
	r := runCLI(t, "plan", "evacuate", "--region", "eu-west", "--topology", in, "--write-topology", out)
	wantRun(t, r, exitOK, nil, []string{"wrote the topology after the plan (version 2) to " + out})
}

// topology validate takes its flags after FILE too.
func TestTopologyValidateFlagAfterFile(t *testing.T) {
	r := runCLI(t, "topology", "validate", exampleTopology, "--json")
	if r.code != exitOK || r.stderr != "" {
		t.Fatalf("want exit 0 and no stderr\n%s", r)
	}
	if got := decodeValidate(t, r); !got.Valid || got.Summary != "3 regions, 11 units, 100 shards, version 1" {
		t.Errorf("got %+v\n%s", got, r)
	}
	r = runCLI(t, "topology", "validate", brokenTopology, "--json")
	if r.code != exitError {
		t.Errorf("exit %d, want 1\n%s", r.code, r)
	}
	if got := decodeValidate(t, r); got.Valid || len(got.Problems) < len(brokenProblems) {
		t.Errorf("got %+v\n%s", got, r)
	}
}

// ---------------------------------------------------------------------------
// The real binary.

// TestBinary builds cellmesh and runs it as a subprocess, to check what
// run's callers cannot: the exit status that main hands to the OS.
func TestBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary; skipped under -short")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command in PATH")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	bin := filepath.Join(t.TempDir(), "cellmesh")
	build := exec.CommandContext(ctx, goTool, "build", "-o", bin, ".")
	build.WaitDelay = 5 * time.Second
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	exec1 := func(t *testing.T, args ...string) result {
		t.Helper()
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.WaitDelay = 5 * time.Second
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		code := 0
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee):
			code = ee.ExitCode()
		case err != nil:
			t.Fatalf("run cellmesh %q: %v", args, err)
		}
		if ctx.Err() != nil {
			t.Fatalf("cellmesh %q: %v", args, ctx.Err())
		}
		return result{code: code, stdout: stdout.String(), stderr: stderr.String()}
	}

	t.Run("route", func(t *testing.T) {
		r := exec1(t, "route", "--topology", exampleTopology, "--uid", "2088123456789012345678901")
		if r.code != exitOK {
			t.Fatalf("exit %d\n%s", r.code, r)
		}
		want := exampleRoute(t, 1, "2088123456789012345678901", false)
		if diff := cmp.Diff(want, decodeRoute(t, r)); diff != "" {
			t.Errorf("route differs (-want +got):\n%s", diff)
		}
	})
	t.Run("route-czone-without-from", func(t *testing.T) {
		wantRun(t, exec1(t, "route", "--topology", exampleTopology, "--path", "/v1/config/x"), exitError, nil, []string{"czone"})
	})
	t.Run("validate-example", func(t *testing.T) {
		wantRun(t, exec1(t, "topology", "validate", exampleTopology), exitOK, []string{": valid (3 regions, 11 units, 100 shards, version 1)"}, nil)
	})
	t.Run("validate-broken", func(t *testing.T) {
		wantRun(t, exec1(t, "topology", "validate", brokenTopology), exitError, []string{"  " + brokenProblems[0]}, nil)
	})
	t.Run("plan-refused", func(t *testing.T) {
		c := planCases[len(planCases)-1]
		wantRun(t, exec1(t, c.cli()...), exitRefused, []string{"result: refused"}, []string{"capacity-headroom"})
	})
	t.Run("usage", func(t *testing.T) {
		wantRun(t, exec1(t), exitUsage, nil, []string{"Usage: cellmesh <command>"})
	})
}

// Removing the global writer, whose only standby is in another region,
// would leave the writer without one: refused, and nothing is written.
func TestPlanRefusedRemoveWriter(t *testing.T) {
	out := filepath.Join(t.TempDir(), "after.yaml")
	r := runCLI(t, "plan", "remove-unit", "--unit", "us-east-g", "--topology", exampleTopology, "--write-topology", out)
	wantRun(t, r, exitRefused, []string{"BROKEN cross-region-standby   global loses its last live standby in another region", "result: refused"},
		[]string{"cross-region-standby: global loses its last live standby in another region"})
	if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused plan wrote %s (stat: %v)", out, err)
	}
}

// Every shape problem of a file is listed, one per line.
func TestTopologyValidateShapeProblemsAtOnce(t *testing.T) {
	path := writeFile(t, t.TempDir(), "shape.yaml", "version: 1\nkey:\n  - {header: a, cookie: b}\nassignments:\n  - {shards: 99-5, primary: a-1}\n  - {shards: x, primary: a-1}\n")
	r := runCLI(t, "topology", "validate", path)
	wantRun(t, r, exitError, []string{"invalid, 3 problem(s)", "line 3", "line 5", "line 6"}, nil)
}

// A topology file records no health: --lost tells a later plan which units
// are down, so an evacuation never promotes one.
func TestPlanLost(t *testing.T) {
	// Shards 0-16 on us-east-1, standbys eu-west-1 then ap-south-1.
	r := runCLI(t, "plan", "evacuate", "--unit", "us-east-1", "--topology", exampleTopology, "--lost", "eu-west-1")
	wantRun(t, r, exitOK, []string{"lost: eu-west-1\n", "shard 0     us-east-1 -> ap-south-1"}, nil)
	if strings.Contains(r.stdout, "-> eu-west-1") {
		t.Errorf("a lost unit was made primary:\n%s", r)
	}
	r = runCLI(t, "plan", "evacuate", "--unit", "us-east-1", "--topology", exampleTopology, "--lost", "mars-1")
	wantRun(t, r, exitError, nil, []string{`lost unit "mars-1" is not in the topology`})
}

func TestCLIEmptyWriteTopologyAndBadKeyHeader(t *testing.T) {
	r := runCLI(t, "plan", "evacuate", "--unit", "us-east-1", "--topology", exampleTopology, "--write-topology", "")
	wantRun(t, r, exitUsage, nil, []string{"--write-topology needs a file name"})
	r = runCLI(t, "route", "--topology", exampleTopology, "--uid", "12", "--key-header", "bad header")
	wantRun(t, r, exitError, nil, []string{`--key-header "bad header" is not a valid HTTP header name`})
}
