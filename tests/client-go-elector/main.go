// Command client-go-elector runs client-go's tools/leaderelection with a
// resourcelock.LeaseLock on a coordination.k8s.io/v1 Lease, so that tests can check that
// leasehold's Kubernetes backend interoperates with the reference implementation.
//
// Every callback is reported as one JSON object per line on stdout (flushed at once);
// klog goes to stderr. See README.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/klog/v2"
)

// event is one line of stdout.
type event struct {
	Event      string `json:"event"`                 // started | stopped | new_leader | exit
	Identity   string `json:"identity"`              // this process's --identity
	Leader     string `json:"leader,omitempty"`      // new_leader only (may be "" - see README)
	WasLeading *bool  `json:"was_leading,omitempty"` // stopped only
	Reason     string `json:"reason,omitempty"`      // exit only
	AtUnixNano int64  `json:"at_unix_nano"`
}

var (
	outMu sync.Mutex
	enc   = json.NewEncoder(os.Stdout)
)

// emit writes one event as a line to stdout. os.Stdout is unbuffered, so each line is
// written with a single write(2) and nothing needs flushing.
func emit(e event) {
	e.AtUnixNano = time.Now().UnixNano()
	outMu.Lock()
	defer outMu.Unlock()
	if err := enc.Encode(e); err != nil {
		fmt.Fprintf(os.Stderr, "client-go-elector: writing stdout: %v\n", err)
	}
}

func main() { os.Exit(run()) }

func run() int {
	fs := flag.NewFlagSet("client-go-elector", flag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "path of the kubeconfig file (required)")
	namespace := fs.String("namespace", "default", "namespace of the Lease")
	name := fs.String("name", "", "name of the Lease (required)")
	identity := fs.String("identity", "", "holder identity of this candidate (required)")
	leaseDuration := fs.Duration("lease-duration", 15*time.Second, "LeaderElectionConfig.LeaseDuration (written to the Lease in whole seconds)")
	renewDeadline := fs.Duration("renew-deadline", 10*time.Second, "LeaderElectionConfig.RenewDeadline")
	retryPeriod := fs.Duration("retry-period", 2*time.Second, "LeaderElectionConfig.RetryPeriod")
	releaseOnCancel := fs.Bool("release-on-cancel", true, "LeaderElectionConfig.ReleaseOnCancel (use --release-on-cancel=false)")
	exitAfterLeading := fs.Duration("exit-after-leading", 0, "once this process has led for this long, cancel (releasing the Lease if --release-on-cancel) and exit 0; 0 = never")
	verbosity := fs.Int("v", 0, "klog verbosity (klog writes to stderr)")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "client-go-elector: unexpected arguments: %q\n", fs.Args())
		return 2
	}
	for _, req := range []struct{ flag, value string }{
		{"kubeconfig", *kubeconfig}, {"name", *name}, {"identity", *identity},
	} {
		if req.value == "" {
			fmt.Fprintf(os.Stderr, "client-go-elector: --%s is required\n", req.flag)
			return 2
		}
	}

	// klog: stderr only, quiet by default.
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	_ = klogFlags.Set("logtostderr", "true")
	_ = klogFlags.Set("v", fmt.Sprint(*verbosity))
	klog.SetOutput(os.Stderr)
	defer klog.Flush()

	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "client-go-elector: loading kubeconfig %s: %v\n", *kubeconfig, err)
		return 1
	}
	// Same as kube-controller-manager & co: a dedicated client with
	// Timeout = max(1s, RenewDeadline/2) and the "leader-election" user agent suffix.
	lock, err := resourcelock.NewFromKubeconfig(resourcelock.LeasesResourceLock, *namespace, *name,
		resourcelock.ResourceLockConfig{Identity: *identity}, cfg, *renewDeadline)
	if err != nil {
		fmt.Fprintf(os.Stderr, "client-go-elector: creating the Lease lock: %v\n", err)
		return 1
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var exitReason atomic.Value // string
	exitReason.Store("")
	stopWith := func(reason string) {
		exitReason.CompareAndSwap("", reason)
		cancel()
	}

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sigs
		stopWith("signal:" + s.String())
		s = <-sigs // a second signal: give up on a clean release
		emit(event{Event: "exit", Identity: *identity, Reason: "second-signal:" + s.String()})
		os.Exit(1)
	}()

	var leading atomic.Bool
	lec := leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   *leaseDuration,
		RenewDeadline:   *renewDeadline,
		RetryPeriod:     *retryPeriod,
		ReleaseOnCancel: *releaseOnCancel,
		Name:            *name,
		Callbacks: leaderelection.LeaderCallbacks{
			// Called by client-go in its own goroutine; ctx ends when leadership ends.
			OnStartedLeading: func(leadCtx context.Context) {
				leading.Store(true)
				emit(event{Event: "started", Identity: *identity})
				if *exitAfterLeading > 0 {
					select {
					case <-time.After(*exitAfterLeading):
						stopWith("exit-after-leading")
					case <-leadCtx.Done():
					}
				}
			},
			// Called every time Run returns, whether or not this process led.
			OnStoppedLeading: func() {
				was := leading.Swap(false)
				emit(event{Event: "stopped", Identity: *identity, WasLeading: &was})
			},
			OnNewLeader: func(leader string) {
				emit(event{Event: "new_leader", Identity: *identity, Leader: leader})
			},
		},
	}
	le, err := leaderelection.NewLeaderElector(lec)
	if err != nil {
		fmt.Fprintf(os.Stderr, "client-go-elector: %v\n", err)
		return 2
	}

	// Run returns when leadership is lost or ctx is cancelled; keep campaigning until
	// cancelled. The same LeaderElector is reused so that its observed record (and so
	// OnNewLeader's "changed" test) carries over between campaigns.
	for ctx.Err() == nil {
		le.Run(ctx)
	}

	emit(event{Event: "exit", Identity: *identity, Reason: exitReason.Load().(string)})
	return 0
}
