package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Tests that cut a region off run in a network namespace of their own
// (and a private mount namespace, where the regions' namespaces are
// mounted), with each region in a namespace of its own behind it: the
// test's namespace routes between the regions (and reaches them all), and
// drops what it forwards to or from a region that is cut off. Nothing
// touches the machine's own network: the namespaces and addresses are the
// test's.

// netnsEnv names the test that a re-executed test binary runs inside its
// own network namespace.
const netnsEnv = "CELLMESH_TEST_NETNS"

// inOwnNetns runs the calling test again in a new network namespace
// (unshare -n) and reports false, having passed on its result; in that
// namespace it brings loopback up and reports true: the caller goes on.
// Without root, unshare, ip or iptables the test is skipped, or fails
// when CELLMESH_REQUIRE_NETNS is set (CI sets it).
func inOwnNetns(t *testing.T) bool {
	t.Helper()
	if os.Getenv(netnsEnv) == t.Name() {
		mustRun(t, "ip", "link", "set", "lo", "up")
		// The regions' namespaces are mounted on a tmpfs of this mount
		// namespace: nothing of them is left on the machine.
		if err := os.MkdirAll("/run/netns", 0o755); err != nil {
			t.Fatal(err)
		}
		mustRun(t, "mount", "-t", "tmpfs", "cellmesh-netns", "/run/netns")
		return true
	}
	missing := func(why string) {
		t.Helper()
		if os.Getenv("CELLMESH_REQUIRE_NETNS") != "" {
			t.Fatalf("network namespaces are required (CELLMESH_REQUIRE_NETNS) but %s", why)
		}
		t.Skipf("needs network namespaces: %s (CI runs it as root with iproute2 and iptables)", why)
	}
	if os.Geteuid() != 0 {
		missing("not running as root")
	}
	for _, tool := range []string{"unshare", "ip", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing(tool + " is not installed")
		}
	}
	if out, err := exec.Command("unshare", "-n", "-m", "--propagation", "private", "true").CombinedOutput(); err != nil {
		missing(fmt.Sprintf("unshare -n -m fails: %v %s", err, out))
	}
	timeout := 10 * time.Minute
	if d, ok := t.Deadline(); ok {
		timeout = time.Until(d) - 10*time.Second
	}
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	// A mount namespace of its own too, private: the regions' namespaces
	// (ip netns add mounts them under /run/netns) go with it, even when
	// the test dies before its cleanup.
	cmd := exec.CommandContext(ctx, "unshare", "-n", "-m", "--propagation", "private", os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v=true", "-test.count=1",
		"-test.timeout="+(timeout-5*time.Second).String())
	cmd.Env = append(os.Environ(), netnsEnv+"="+t.Name())
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	t.Logf("in a network namespace of its own:\n%s", out.String())
	if err != nil {
		t.Fatalf("%s in its network namespace: %v", t.Name(), err)
	}
	if !strings.Contains(out.String(), "--- PASS: "+t.Name()+" ") {
		t.Fatalf("%s did not run in its network namespace (no PASS line)", t.Name())
	}
	return false
}

// mustRun runs a command the test needs to succeed.
func mustRun(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// regionNet is one network namespace per region, each joined to the
// test's namespace by a veth pair: region i is 10.201.i.2/24, its
// router 10.201.i.1.
type regionNet struct {
	t      *testing.T
	ns     map[string]string // region -> namespace
	ip     map[string]string // region -> its address
	subnet map[string]string
}

// newRegionNet makes the regions' namespaces; the test's cleanup removes
// them. It runs in the test's own namespace (inOwnNetns).
func newRegionNet(t *testing.T, regions ...string) *regionNet {
	t.Helper()
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		t.Fatalf("routing between the regions: %v", err)
	}
	n := &regionNet{t: t, ns: map[string]string{}, ip: map[string]string{}, subnet: map[string]string{}}
	for i, region := range regions {
		ns := fmt.Sprintf("cellmesh-%d-%s", os.Getpid(), region)
		mustRun(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "delete", ns).Run() })
		veth := "cm-" + region
		router, addr := fmt.Sprintf("10.201.%d.1", i+1), fmt.Sprintf("10.201.%d.2", i+1)
		mustRun(t, "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
		mustRun(t, "ip", "addr", "add", router+"/24", "dev", veth)
		mustRun(t, "ip", "link", "set", veth, "up")
		for _, args := range [][]string{
			{"ip", "link", "set", "lo", "up"},
			{"ip", "addr", "add", addr + "/24", "dev", "eth0"},
			{"ip", "link", "set", "eth0", "up"},
			{"ip", "route", "add", "default", "via", router},
		} {
			mustRun(t, "ip", append([]string{"netns", "exec", ns}, args...)...)
		}
		n.ns[region], n.ip[region], n.subnet[region] = ns, addr, fmt.Sprintf("10.201.%d.0/24", i+1)
	}
	return n
}

// cut drops every packet forwarded to or from region: the region is cut
// off from the others (the test itself still reaches it).
func (n *regionNet) cut(region string) {
	n.t.Helper()
	mustRun(n.t, "iptables", "-I", "FORWARD", "-s", n.subnet[region], "-j", "DROP")
	mustRun(n.t, "iptables", "-I", "FORWARD", "-d", n.subnet[region], "-j", "DROP")
}

// heal ends every cut.
func (n *regionNet) heal() {
	n.t.Helper()
	mustRun(n.t, "iptables", "-F", "FORWARD")
}

// command is how a process of region starts: in the region's namespace.
func (n *regionNet) command(region, bin string, args ...string) *exec.Cmd {
	if n == nil || region == "" {
		return exec.Command(bin, args...)
	}
	return exec.Command("ip", append([]string{"netns", "exec", n.ns[region], bin}, args...)...)
}

// addr is a free address for a process of region: a port handed out once
// (see freePort) on the region's address; on loopback with no regionNet.
func (n *regionNet) addr(t *testing.T, region, network string) string {
	t.Helper()
	var a string
	switch network {
	case "gossip":
		a = freeGossip(t)
	default:
		a = freePort(t, network)
	}
	if n == nil {
		return a
	}
	return strings.Replace(a, "127.0.0.1:", n.ip[region]+":", 1)
}
