package main

// Tasks that take time, as vCenter's do.
//
// govmomi's simulator runs a task inside the call that starts it: CloneVM_Task answers once the
// clone exists, with the task already finished. Its -delay options only slow the call itself,
// so a client that (like governord's vSphere provider) starts a task and then polls it would
// hold a connection and a thread for the whole clone, which no real vCenter makes it do.
//
// With -task-delay METHOD=MS, a call of METHOD (a *_Task method) is answered at once with a
// new task in state "queued"; MS milliseconds later the original request is replayed to the
// simulator, and the task ends with that call's result or fault. Pollers see it queued until
// then, as they see a real clone that is still copying disks.

import (
	"bytes"
	"context"
	"fmt"
	"html"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// taskDelayFlag collects -task-delay METHOD=MS flags.
type taskDelayFlag map[string]time.Duration

func (m taskDelayFlag) String() string {
	parts := make([]string, 0, len(m))
	for method, d := range m {
		parts = append(parts, fmt.Sprintf("%s=%d", method, d.Milliseconds()))
	}
	return strings.Join(parts, ",")
}

func (m taskDelayFlag) Set(value string) error {
	method, ms, found := strings.Cut(value, "=")
	delay, err := strconv.Atoi(ms)
	if !found || !strings.HasSuffix(method, "_Task") || err != nil || delay < 0 {
		return fmt.Errorf("want METHOD_Task=MILLISECONDS, not %q", value)
	}
	m[method] = time.Duration(delay) * time.Millisecond
	return nil
}

var (
	taskMethod = regexp.MustCompile(`<(?:\w+:)?(\w+_Task)[\s>]`)
	taskThis   = regexp.MustCompile(`<(?:\w+:)?_this[^>]*type="(\w+)"[^>]*>([^<]+)<`)
	taskReturn = regexp.MustCompile(`<returnval[^>]*type="Task"[^>]*>([^<]+)<`)
	faultText  = regexp.MustCompile(`<faultstring>([^<]*)<`)
)

// delayTasks wraps the simulator's HTTP handler so that the listed task methods take time.
func delayTasks(next http.Handler, delays taskDelayFlag) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || !strings.HasPrefix(r.URL.Path, "/sdk") {
			next.ServeHTTP(w, r)
			return
		}
		body, err := io.ReadAll(r.Body)
		_ = r.Body.Close()
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		method := taskMethod.FindSubmatch(body)
		this := taskThis.FindSubmatch(body)
		if method == nil || this == nil {
			next.ServeHTTP(w, r)
			return
		}
		delay, ok := delays[string(method[1])]
		entity := simulator.Map.Get(types.ManagedObjectReference{Type: string(this[1]), Value: string(this[2])})
		if !ok || entity == nil {
			next.ServeHTTP(w, r)
			return
		}
		var result types.AnyType
		var fault types.BaseMethodFault
		name := strings.TrimSuffix(string(method[1]), "_Task")
		task := simulator.CreateTask(entity, name, func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
			return result, fault
		})
		replay := r.Clone(context.Background())
		go func() {
			time.Sleep(delay)
			result, fault = runNow(next, replay, body)
			simulator.Map.WithLock(task, func() { task.Run() })
		}()
		w.Header().Set("Content-Type", "text/xml; charset=utf-8")
		fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?>`+
			`<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" `+
			`xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">`+
			`<soapenv:Body><%sResponse xmlns="urn:vim25"><returnval type="Task">%s</returnval></%sResponse>`+
			`</soapenv:Body></soapenv:Envelope>`, method[1], task.Self.Value, method[1])
	})
}

// runNow replays a task call to the simulator and returns how its task ended.
func runNow(next http.Handler, r *http.Request, body []byte) (types.AnyType, types.BaseMethodFault) {
	r.Body = io.NopCloser(bytes.NewReader(body))
	recorder := httptest.NewRecorder()
	next.ServeHTTP(recorder, r)
	answer := recorder.Body.Bytes()
	ref := taskReturn.FindSubmatch(answer)
	if ref == nil {
		reason := "the delayed call failed"
		if text := faultText.FindSubmatch(answer); text != nil {
			reason = html.UnescapeString(string(text[1]))
		}
		return nil, &types.SystemError{Reason: reason}
	}
	inner, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "Task", Value: string(ref[1])}).(*simulator.Task)
	if !ok {
		log.Printf("vcsim: delayed task: no task %s", ref[1])
		return nil, &types.SystemError{Reason: "the delayed call's task vanished"}
	}
	var result types.AnyType
	var fault types.BaseMethodFault
	simulator.Map.WithLock(inner, func() {
		result = inner.Info.Result
		if inner.Info.Error != nil {
			fault = inner.Info.Error.Fault
		}
	})
	return result, fault
}
