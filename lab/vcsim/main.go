// Command vcsim is governord's launcher for the vCenter simulator of govmomi.
//
// Debian packages govmomi's simulator library (golang-github-vmware-govmomi-dev) but not the
// upstream vcsim command, so the project builds this small main package from the library,
// offline (see build.sh). On start it prints one line
//
//	LISTENING https://127.0.0.1:<port>/sdk
//
// on stdout (what lab/process.py waits for), followed by the upstream-style
// "export GOVC_URL=..." line, and serves until SIGTERM or SIGINT.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"

	// These register their HTTP endpoints with the simulator (vAPI REST incl. tagging, lookup, STS, PBM),
	// as the upstream vcsim does.
	_ "github.com/vmware/govmomi/lookup/simulator"
	_ "github.com/vmware/govmomi/pbm/simulator"
	_ "github.com/vmware/govmomi/sts/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator"
)

func main() {
	listen := flag.String("l", "127.0.0.1:8989", "listen address (port 0 picks a free port)")
	esx := flag.Bool("esx", false, "simulate a standalone ESXi host instead of vCenter")
	useTLS := flag.Bool("tls", true, "serve HTTPS (with a self-signed localhost certificate unless -tlscert)")
	tlsCert := flag.String("tlscert", "", "PEM certificate (chain) to serve instead of the built-in localhost one")
	tlsKey := flag.String("tlskey", "", "PEM private key of -tlscert")
	username := flag.String("username", "", "login user name (empty: any non-empty credentials are accepted)")
	password := flag.String("password", "", "login password")
	trace := flag.Bool("trace", false, "write SOAP traffic to stderr")

	model := simulator.VPX()
	flag.IntVar(&model.Datacenter, "dc", model.Datacenter, "number of datacenters")
	flag.IntVar(&model.Cluster, "cluster", model.Cluster, "number of clusters per datacenter")
	flag.IntVar(&model.ClusterHost, "host", model.ClusterHost, "number of hosts per cluster")
	flag.IntVar(&model.Host, "standalone-host", model.Host, "number of standalone hosts per datacenter")
	flag.IntVar(&model.Machine, "vm", model.Machine, "number of virtual machines per resource pool")
	flag.IntVar(&model.Pool, "pool", model.Pool, "number of child resource pools per cluster")
	flag.IntVar(&model.Datastore, "ds", model.Datastore, "number of local datastores")
	flag.IntVar(&model.Folder, "folder", model.Folder, "number of datacenters placed in a folder")
	flag.IntVar(&model.Portgroup, "pg", model.Portgroup, "number of distributed port groups per datacenter")
	flag.IntVar(&model.App, "app", model.App, "number of virtual apps per cluster")
	flag.IntVar(&model.Pod, "pod", model.Pod, "number of storage pods per cluster")
	flag.BoolVar(&model.Autostart, "autostart", model.Autostart, "power on the model's virtual machines")
	flag.IntVar(&model.DelayConfig.Delay, "delay", 0, "milliseconds to delay every SOAP call")
	methodDelays := methodDelayFlag{}
	flag.Var(methodDelays, "method-delay",
		"METHOD=MS: delay every call of one SOAP method (e.g. CloneVM_Task=8000) before it runs; repeatable")
	taskDelays := taskDelayFlag{}
	flag.Var(taskDelays, "task-delay",
		"METHOD_Task=MS: answer at once with a task that ends MS later (e.g. CloneVM_Task=20000); repeatable")
	flag.Parse()
	if len(methodDelays) > 0 {
		model.DelayConfig.MethodDelay = methodDelays
	}

	if *esx {
		// The ESX model has no datacenter inventory of its own; keep its storage and VMs only.
		m := simulator.ESX()
		m.Machine = model.Machine
		m.Datastore = model.Datastore
		m.Autostart = model.Autostart
		model = m
	}
	simulator.Trace = *trace
	if (*username == "") != (*password == "") {
		log.Fatal("vcsim: -username and -password go together")
	}

	if err := model.Create(); err != nil {
		log.Fatalf("vcsim: creating the inventory: %s", err)
	}
	defer model.Remove()

	model.Service.RegisterEndpoints = true
	model.Service.Listen = &url.URL{Host: *listen}
	if *username != "" {
		model.Service.Listen.User = url.UserPassword(*username, *password)
	}
	if *useTLS {
		model.Service.TLS = new(tls.Config)
		if *tlsCert != "" {
			// The built-in certificate has a 1024-bit key that OpenSSL's default security level
			// rejects, so a client that verifies TLS needs a real one.
			cert, err := tls.LoadX509KeyPair(*tlsCert, *tlsKey)
			if err != nil {
				log.Fatalf("vcsim: loading -tlscert/-tlskey: %s", err)
			}
			model.Service.TLS.Certificates = []tls.Certificate{cert}
		}
	}

	server := model.Service.NewServer()
	defer server.Close()
	if len(taskDelays) > 0 {
		// set before the port is announced, so before any request
		server.Config.Handler = delayTasks(server.Config.Handler, taskDelays)
	}

	u := *server.URL
	u.User = nil
	withUser := *server.URL
	// stdout may be a pipe: write whole lines and sync so the parent sees them at once.
	fmt.Fprintf(os.Stdout, "LISTENING %s\n", u.String())
	fmt.Fprintf(os.Stdout, "export GOVC_URL=%s GOVC_SIM_PID=%d\n", withUser.String(), os.Getpid())
	_ = os.Stdout.Sync()

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
}

// methodDelayFlag collects -method-delay METHOD=MS flags into the simulator's MethodDelay map.
type methodDelayFlag map[string]int

func (m methodDelayFlag) String() string {
	parts := make([]string, 0, len(m))
	for method, ms := range m {
		parts = append(parts, fmt.Sprintf("%s=%d", method, ms))
	}
	return strings.Join(parts, ",")
}

func (m methodDelayFlag) Set(value string) error {
	method, ms, found := strings.Cut(value, "=")
	delay, err := strconv.Atoi(ms)
	if !found || method == "" || err != nil || delay < 0 {
		return fmt.Errorf("want METHOD=MILLISECONDS, not %q", value)
	}
	m[method] = delay
	return nil
}
