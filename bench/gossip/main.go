// Command gossip measures failure detection with cellmesh's gossip
// (package failover over hashicorp/memberlist) on this machine.
//
//	gossip -mode detect -profile fast -members 10 -kills 20
//	    N members in this process; one at a time is stopped without
//	    leaving (as a SIGKILL would), and the time until another member
//	    sees it dead is measured. Prints p50, p99 and max.
//	gossip -mode soak -profile fast -members 10 -duration 10m
//	    N members as separate processes; one is paused with SIGSTOP for
//	    300 ms every 5 s for the duration. Any member seen dead is a false
//	    death. Prints the pauses and the false deaths (want 0).
//
// Every member binds 127.0.0.1 on a free port; gossip is encrypted.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cellmesh/cellmesh/failover"
)

var key = []byte("cellmesh-bench-gossip-key-32byte")

func main() {
	mode := flag.String("mode", "detect", "detect, soak, or member (a soak's subprocess)")
	profile := flag.String("profile", "fast", "gossip profile: lan, wan or fast")
	members := flag.Int("members", 10, "pool size")
	kills := flag.Int("kills", 20, "detect: members stopped one after another")
	duration := flag.Duration("duration", 10*time.Minute, "soak: how long")
	pause := flag.Duration("pause", 300*time.Millisecond, "soak: how long each SIGSTOP lasts")
	every := flag.Duration("every", 5*time.Second, "soak: how often a member is paused")
	bind := flag.String("bind", "", "member: gossip address")
	join := flag.String("join", "", "member: address to join")
	flag.Parse()
	p, err := failover.ParseProfile(*profile)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	switch *mode {
	case "detect":
		err = detect(p, *members, *kills)
	case "soak":
		err = soak(p, *members, *duration, *pause, *every)
	case "member":
		err = member(p, *bind, *join)
	default:
		err = fmt.Errorf("mode %q: want detect, soak or member", *mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gossip:", err)
		os.Exit(1)
	}
}

func freeAddr() (string, error) {
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		a := l.Addr().String()
		u, err := net.ListenPacket("udp", a)
		l.Close()
		if err == nil {
			u.Close()
			return a, nil
		}
	}
	return "", fmt.Errorf("no port free for both UDP and TCP")
}

// watcher records when members are seen dead.
type watcher struct {
	mu   sync.Mutex
	dead map[string]time.Time
	ch   chan string
}

func (w *watcher) Observe(now time.Time, m failover.Member) {
	if m.State != failover.MemberDead {
		return
	}
	w.mu.Lock()
	if _, ok := w.dead[m.Name]; !ok {
		w.dead[m.Name] = now
		select {
		case w.ch <- m.Name:
		default:
		}
	}
	w.mu.Unlock()
}

func start(p failover.Profile, i int, join string, obs failover.Observer) (*failover.Membership, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	var joins []string
	if join != "" {
		joins = []string{join}
	}
	ms, err := failover.Start(failover.Config{
		Meta: failover.Meta{Role: failover.RoleSidecar, Region: "bench", Unit: fmt.Sprintf("u%d", i), Service: "s", Address: addr},
		Bind: addr, Join: joins, Profile: p, Keys: [][]byte{key}, Observer: obs,
	})
	if err != nil {
		return nil, err
	}
	go ms.Run(context.Background())
	return ms, nil
}

func detect(p failover.Profile, n, kills int) error {
	w := &watcher{dead: map[string]time.Time{}, ch: make(chan string, 1)}
	observer, err := start(p, 0, "", w)
	if err != nil {
		return err
	}
	defer observer.Close()
	nop := failover.NewHealth(failover.HealthConfig{})
	var pool []*failover.Membership
	spawn := func(i int) error {
		ms, err := start(p, i, observer.Addr(), nop)
		if err != nil {
			return err
		}
		pool = append(pool, ms)
		return nil
	}
	for i := 1; i < n; i++ {
		if err := spawn(i); err != nil {
			return err
		}
	}
	time.Sleep(3 * time.Second) // the pool settles
	var took []time.Duration
	for k := range kills {
		victim := pool[k%len(pool)]
		killed := time.Now()
		victim.Kill()
		select {
		case <-w.ch:
			took = append(took, time.Since(killed))
		case <-time.After(2 * time.Minute):
			return fmt.Errorf("member %s not seen dead within 2 minutes", victim.Name())
		}
		// Replace it, so the pool keeps its size.
		pool = slices.DeleteFunc(pool, func(m *failover.Membership) bool { return m == victim })
		if err := spawn(n + k); err != nil {
			return err
		}
		time.Sleep(time.Second)
	}
	for _, m := range pool {
		m.Kill()
	}
	slices.Sort(took)
	q := func(f float64) time.Duration { return took[min(len(took)-1, int(f*float64(len(took))))] }
	fmt.Printf("profile %s, %d members, %d kills: detection p50 %s, p99 %s, max %s\n", p, n, len(took),
		q(0.5).Round(time.Millisecond), q(0.99).Round(time.Millisecond), took[len(took)-1].Round(time.Millisecond))
	return nil
}

func soak(p failover.Profile, n int, d, pause, every time.Duration) error {
	w := &watcher{dead: map[string]time.Time{}, ch: make(chan string, 64)}
	observer, err := start(p, 0, "", w)
	if err != nil {
		return err
	}
	defer observer.Close()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	var procs []*exec.Cmd
	defer func() {
		for _, c := range procs {
			c.Process.Signal(syscall.SIGCONT)
			c.Process.Kill()
			c.Wait()
		}
	}()
	for range n - 1 {
		addr, err := freeAddr()
		if err != nil {
			return err
		}
		c := exec.Command(self, "-mode", "member", "-profile", string(p), "-bind", addr, "-join", observer.Addr())
		c.Stderr = os.Stderr
		if err := c.Start(); err != nil {
			return err
		}
		procs = append(procs, c)
	}
	time.Sleep(5 * time.Second)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	end := time.Now().Add(d)
	pauses := 0
	t := time.NewTicker(every)
	defer t.Stop()
	for time.Now().Before(end) {
		select {
		case <-ctx.Done():
			end = time.Now()
			continue
		case <-t.C:
		}
		c := procs[pauses%len(procs)]
		c.Process.Signal(syscall.SIGSTOP)
		time.Sleep(pause)
		c.Process.Signal(syscall.SIGCONT)
		pauses++
		if pauses%12 == 0 {
			fmt.Printf("%s: %d pauses, %d false deaths\n", time.Now().Format(time.TimeOnly), pauses, len(w.dead))
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	var names []string
	for name := range w.dead {
		names = append(names, name)
	}
	fmt.Printf("profile %s, %d members, %s: %d pauses of %s every %s, %d false deaths %s\n", p, n, d, pauses, pause, every, len(w.dead), strings.Join(names, " "))
	if len(w.dead) > 0 {
		return fmt.Errorf("%d false deaths", len(w.dead))
	}
	return nil
}

func member(p failover.Profile, bind, join string) error {
	ms, err := failover.Start(failover.Config{
		Meta: failover.Meta{Role: failover.RoleSidecar, Region: "bench", Unit: "u-" + bind, Service: "s", Address: bind},
		Bind: bind, Join: []string{join}, Profile: p, Keys: [][]byte{key}, Observer: failover.NewHealth(failover.HealthConfig{}),
	})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	return ms.Run(ctx)
}
